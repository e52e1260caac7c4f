"""See inside the LSTM while it writes a caption: its gates at every generated word, as numbers and as a picture,
and, for a model trained with --decoder attention, where it looked in the image for every word.

    python sample.py --image png/example.png --checkpoint models/demo/best.pt --gates png/example_gates.png
    python sample.py --image png/example.png --checkpoint models/demo/best.pt --gates_json gates.json
    python sample.py --image png/example.png --checkpoint models/demo_attention/best.pt --attention attention.png
    python gate_units.py --checkpoint models/demo/best.pt   # units that track something, on the synthetic set

The decoder first writes its caption exactly as sample.py does (greedy, or the best beam). `replay` then runs
that caption's words through the LSTM once more, one DIY_LSTM.lstm_step at a time on the LSTM's own
parameters, and keeps every value along the way. Training and ordinary decoding never run this code,
so recording costs them nothing.
"""
import io
import json
import math
import textwrap

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_loader import eval_transform
from DIY_LSTM import CellValues, lstm_step
from files import atomic_write, load_image
from model import AttentionDecoder, DecodeSettings, ids_to_sentence

# What each heatmap shows, in the letters of DIY_LSTM.py, its colour map and its range.
PANELS = (('g', 'input gate g', 'viridis', 0, 1), ('f', 'forget gate f', 'viridis', 0, 1),
          ('q', 'output gate q', 'viridis', 0, 1), ('s', 'memory s, shown as tanh(s)', 'RdBu_r', -1, 1))


def stacked(steps):
    """The values of every step (DIY_LSTM.CellValues of one row each), one (steps, hidden) tensor per letter."""
    return {key: torch.cat([getattr(step, key) for step in steps]) for key in CellValues._fields}


@torch.no_grad()
def replay(decoder, feature, ids):
    """g, f, a, q, s and h of every layer at every step, for one caption's word ids (ending with <end> if any).

    Step 0 sees the image feature and writes word 0; step t sees word t-1 and writes word t. Returns one dict
    per layer, each value a (steps, hidden) tensor. The attention decoder has one layer, its cell; feature is
    then the image's grid (cells, features).
    """
    if isinstance(decoder, AttentionDecoder):
        return [replay_attention(decoder, feature, ids)]
    lstm = decoder.lstm
    inputs = torch.cat([feature.unsqueeze(0), decoder.embed(ids[:-1])])
    layers = []
    for layer in range(lstm.num_layers):
        weight_ih, weight_hh, bias, _ = lstm.layer_weights(layer, 0)
        z_x = nn.functional.linear(inputs, weight_ih, bias)  # U x(t) + b of every step
        h = s = inputs.new_zeros(1, lstm.hidden_size)
        steps = []
        for t in range(len(inputs)):
            steps.append(lstm_step(z_x[t:t + 1], h, s, weight_hh))
            h, s = steps[-1].h, steps[-1].s
        layers.append(stacked(steps))
        inputs = layers[-1]['h']
    return layers


def replay_attention(decoder, grid, ids):
    """The attention decoder's cell, replayed as replay does the fc decoder's LSTM. Its input at step t is
    AttentionDecoder.cell_input's, [embedding of word t-1; beta * context]; step 0 has no word before it, so
    zeros, and h(0), s(0) come from the mean cell, as in AttentionDecoder.start."""
    first, state = decoder.start(grid.unsqueeze(0))
    words = torch.cat([first, decoder.embed(ids[:-1])])
    h, s = state.h, state.s
    steps = []
    for word in words:
        x, _ = decoder.cell_input(word.unsqueeze(0), h, state.grid, state.keys)
        steps.append(decoder.cell.step(x, (h, s)))
        h, s = steps[-1].h, steps[-1].s
    return stacked(steps)


def as_seen(image, config):
    """The image resized and centre-cropped as eval_transform does, before it becomes a tensor: the area that the
    attention decoder's grid of cells covers."""
    resize, crop = eval_transform(config.image_size, config.crop_size).transforms[:2]
    return crop(resize(image))


@torch.no_grad()
def record(path, captioner, settings=DecodeSettings()):
    """Caption one image as sample.py does (a decoding.TrainedCaptioner, greedy or beam search as settings say)
    and replay its LSTM: a dict with the image, its feature, the caption, its words and the gates. For the
    attention decoder also 'attention', the weights (steps, cells) with which each word was chosen, and 'seen',
    the crop of the image they cover; both None for the fc decoder.

    Raises files.ImageError for an unreadable image.
    """
    encoder, decoder, vocab, config = captioner
    image = load_image(path)
    transform = eval_transform(config.image_size, config.crop_size, config.normalization)
    feature = encoder(transform(image).unsqueeze(0).to(captioner.device))
    ids = captioner.decode(feature, settings)[0]
    ends = (ids == vocab('<end>')).nonzero()
    ids = ids[:int(ends[0]) + 1] if len(ends) else ids  # up to and including the first <end>
    layers = replay(decoder, feature[0], ids)
    log_probs = decoder.linear(layers[-1]['h']).log_softmax(-1).gather(1, ids.unsqueeze(1)).squeeze(1)
    attention = isinstance(decoder, AttentionDecoder)
    return dict(image=image, feature=feature.cpu(), caption=ids_to_sentence(ids.cpu(), vocab), ids=ids.cpu(),
                words=[vocab.idx2word[int(i)] for i in ids], log_probs=log_probs.cpu(),
                layers=[{key: value.cpu() for key, value in layer.items()} for layer in layers],
                decoding=f'beam search, beam {settings.beam_size}' if settings.beam_size > 1 else 'greedy',
                attention=decoder.attention_maps(feature[0], ids).cpu() if attention else None,
                seen=as_seen(image, config) if attention else None)


def top_units(layer, top=32):
    """The `top` units whose g, f, q and tanh(s) change most over the caption: the largest sum of their
    standard deviations over the steps, most varying first."""
    spread = [layer[key].std(0, correction=0) for key in ('g', 'f', 'q')]
    score = sum(spread) + torch.tanh(layer['s']).std(0, correction=0)
    return score.argsort(descending=True, stable=True)[:top]


def figure(result, top=32):
    """A matplotlib Figure: the image and caption, then one heatmap per gate of the top layer (steps across,
    the `top` most varying units down, and a last row with the mean over all units)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in a web server's threads
    layer = result['layers'][-1]
    units = top_units(layer, top)
    words, hidden = result['words'], layer['g'].size(1)
    rows = len(units) + 1
    panel_height = 0.11 * rows + 0.9
    fig = Figure(figsize=(max(7.0, 2.2 + 0.42 * len(words)), 2.6 + 4 * panel_height), layout='constrained')
    grid = fig.add_gridspec(5, 2, height_ratios=[2.6] + [panel_height] * 4, width_ratios=[1, 0.025])
    top_axes = fig.add_subplot(grid[0, :])
    top_axes.imshow(np.asarray(result['image']))
    top_axes.set_axis_off()
    depth = len(result['layers'])
    where = f'top layer of {depth}, {hidden} units' if depth > 1 else f'{hidden} hidden units'
    top_axes.set_title(f'{result["caption"]}\n({result["decoding"]}; {where})', fontsize=11)
    for row, (key, name, cmap, low, high) in enumerate(PANELS, start=1):
        values = torch.tanh(layer[key]) if key == 's' else layer[key]
        shown = torch.cat([values[:, units], values.mean(1, keepdim=True)], dim=1).T.numpy()
        axes = fig.add_subplot(grid[row, 0])
        picture = axes.imshow(shown, aspect='auto', cmap=cmap, vmin=low, vmax=high, interpolation='nearest')
        axes.axhline(rows - 1.5, color='white', linewidth=2)  # sets the mean row apart
        axes.set_yticks(range(rows), [f'unit {int(u)}' for u in units] + [f'mean of {hidden}'], fontsize=6)
        axes.set_xticks(range(len(words)), words, rotation=45, ha='right', fontsize=8)
        axes.set_title(name, loc='left', fontsize=10, fontweight='bold')
        fig.colorbar(picture, cax=fig.add_subplot(grid[row, 1]))
    note = (f'Rows: the {len(units)} units whose g, f, q and tanh(s) vary most over this caption (largest sum of '
            'their standard deviations), then the mean over all units. Columns: the step that wrote each word.')
    fig.supxlabel('\n'.join(textwrap.wrap(note, int(fig.get_figwidth() * 15))), fontsize=7)
    return fig


def attention_panels(result):
    """The steps that get a panel in the attention picture: every word of the caption, and <end>, but not a
    first <start>, which train.py's captions always begin with, whatever the image."""
    return [t for t, word in enumerate(result['words']) if t > 0 or word != '<start>']


def attention_figure(result, columns=6):
    """A matplotlib Figure of the attention decoder's weights: one panel per word (see attention_panels), the
    image as the model saw it with the weights of the step that chose the word laid over it. The grid's
    weights are upsampled bilinearly to the image, so each cell's weight is brightest at the cell's centre; one
    colour scale, from 0 to the largest weight of the caption, serves every panel, so panels compare."""
    from matplotlib.figure import Figure
    seen = np.asarray(result['seen'])
    steps = attention_panels(result)
    weights = result['attention']
    side = math.isqrt(weights.size(1))  # the grid is square: side x side cells
    maps = nn.functional.interpolate(weights.view(-1, 1, side, side), size=seen.shape[:2], mode='bilinear',
                                     align_corners=False)[:, 0].numpy()
    columns = max(1, min(columns, len(steps)))
    rows = -(-len(steps) // columns)
    fig = Figure(figsize=(2.1 * columns, 2.3 * rows + 0.9), layout='constrained')
    for panel, step in enumerate(steps):
        axes = fig.add_subplot(rows, columns, panel + 1)
        axes.imshow(seen)
        axes.imshow(maps[step], cmap='inferno', alpha=0.6, vmin=0, vmax=float(weights.max()))
        axes.set_title(result['words'][step], fontsize=11)
        axes.set_axis_off()
    fig.suptitle(f'{result["caption"]}\n({result["decoding"]}; {side}x{side} cells, bright: more attention, '
                 f'up to {float(weights.max()):.2f} of it on one cell)', fontsize=10)
    return fig


def png_bytes(fig, dpi=100):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=dpi)
    return buffer.getvalue()


def picture(result, top=32):
    """The gate picture as a PIL image, for app.py."""
    return Image.open(io.BytesIO(png_bytes(figure(result, top))))


def attention_picture(result):
    """The attention picture as a PIL image, for app.py."""
    return Image.open(io.BytesIO(png_bytes(attention_figure(result))))


def as_json(result):
    """The raw numbers: for every layer and every value, one list per step (one per word) of one number per unit."""
    layers = [{key: value.double().round(decimals=6).tolist() for key, value in layer.items()}
              for layer in result['layers']]
    return dict(caption=result['caption'], decoding=result['decoding'], words=result['words'],
                log_probs=result['log_probs'].double().round(decimals=6).tolist(),
                letters=dict(g='input gate', f='forget gate', a='new content', q='output gate', s='memory',
                             h='hidden state'),
                layers=layers)


def save(result, png_path=None, json_path=None, attention_path=None, top=32):
    """Write the gate picture, the numbers and/or the attention picture, each through a temporary file, so none
    is ever half-written."""
    if png_path:
        data = png_bytes(figure(result, top))
        atomic_write(png_path, lambda f: f.write(data))
    if json_path:
        text = json.dumps(as_json(result)).encode()
        atomic_write(json_path, lambda f: f.write(text))
    if attention_path:
        data = png_bytes(attention_figure(result))
        atomic_write(attention_path, lambda f: f.write(data))
