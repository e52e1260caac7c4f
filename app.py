"""A local web page for the captioner: upload an image, read its captions and look at the LSTM's gates.

    python app.py                                  # the first model there is (see --checkpoint) on http://127.0.0.1:7860
    python app.py --checkpoint models/checkpoint.pt --port 8080 --host 0.0.0.0

The page shows the greedy caption, the beam-search captions with their log-probabilities, and the gate picture
of gates.py; for a model trained with --decoder attention, the attention picture of sample.py --attention beside it.
It needs no internet: the fonts and scripts come from the gradio package, and analytics are off.
"""
import argparse
import os
import sys

os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'  # read when gradio is imported: no telemetry, no version check
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import gradio as gr

import gates
from decoding import default_model, load_captioner
from files import CheckpointError, ImageError
from flags import HelpFormatter, count, positive_int
from model import DecodeSettings, ids_to_sentence

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = [os.path.join(HERE, 'png', name) for name in ('example.png', 'example_single.png')]


def describe(path, captioner, settings):
    """(message, greedy caption, table in Markdown of the settings.beam_size beams, gate picture, attention picture)
    for one uploaded file; the attention picture is None for an fc model, which has none."""
    if path is None:
        return '', '', '', None, None
    try:
        result = gates.record(path, captioner)
    except ImageError as err:
        why = str(err).removeprefix(f'{path}: ')  # the upload's temporary path means nothing to the user
        return f'error: {os.path.basename(path)}: {why}; upload a PNG or JPEG', '', '', None, None
    vocab = captioner.vocab
    beams, scores = captioner.decoder.beam_search(result['feature'], settings.for_vocab(vocab), all_beams=True)
    rows = [f'| {rank} | {ids_to_sentence(ids, vocab)} | {score:.3f} |'
            for rank, (ids, score) in enumerate(zip(beams[0], scores[0].tolist()), start=1) if score > -float('inf')]
    table = '\n'.join([f'| beam | caption (beam size {settings.beam_size}) | log p |', '|---:|---|---:|', *rows])
    attention = gates.attention_picture(result) if result['attention'] is not None else None
    return '', result['caption'], table, gates.picture(result), attention


def build(captioner, settings, model_line=None):
    """The page; model_line, which model it uses when none was named, goes beneath the title. The attention picture
    is there only for a model trained with --decoder attention."""
    attention = captioner.config.decoder == 'attention'
    with gr.Blocks(title='Captioner: inside the LSTM', analytics_enabled=False) as page:
        gr.Markdown('# Image captioning with a hand-written LSTM\nUpload an image or pick an example. The picture '
                    'at the bottom shows the LSTM at every word it wrote: input gate g, forget gate f, output '
                    'gate q and memory s (as tanh(s)); docs/lstm.md says how to read it.'
                    + (' Beside it, where the model looked in the image for each word.' if attention else '')
                    + (f'\n\n{model_line}' if model_line else ''))
        with gr.Row():
            upload = gr.File(label='image', type='filepath', elem_id='upload')
            with gr.Column():
                message = gr.Markdown(elem_id='message')
                greedy = gr.Textbox(label='greedy caption', interactive=False, elem_id='greedy')
                table = gr.Markdown(elem_id='beams')
        gr.Examples([[path] for path in EXAMPLES if os.path.exists(path)], inputs=[upload])
        with gr.Row():
            gate_picture = gr.Image(label='gates of the greedy caption', type='pil', interactive=False,
                                    elem_id='gates', format='png')
            attention_picture = gr.Image(label='attention of the greedy caption', type='pil', interactive=False,
                                         elem_id='attention', format='png', visible=attention)
        upload.change(lambda path: describe(path, captioner, settings), inputs=[upload],
                      outputs=[message, greedy, table, gate_picture, attention_picture])
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument('--checkpoint', type=str, default=None,
                        help='checkpoint from train.py, or folder from export.py --format safetensors (None: the '
                             'first there is of models/checkpoint.pt, the demo\'s models/demo/most_accurate.pt and '
                             'the shipped shapes model models/shapes)')
    parser.add_argument('--port', type=count, default=7860, help='port to serve the page on')
    parser.add_argument('--host', type=str, default='127.0.0.1', help='0.0.0.0 to serve other machines too')
    parser.add_argument('--beam_size', type=positive_int, default=3, help='beams shown on the page')
    args = parser.parse_args(argv)
    model_line = None
    if args.checkpoint is None:
        args.checkpoint, model_line = default_model('models/checkpoint.pt', 'models/demo/most_accurate.pt')
    if model_line:
        print(model_line, flush=True)
    if not os.path.exists(args.checkpoint):
        sys.exit(f'error: {args.checkpoint}: no such file; run `python demo.py` to train one (about 8 minutes), '
                 'or pass --checkpoint PATH')
    try:
        captioner = load_captioner(args.checkpoint)
    except CheckpointError as err:
        sys.exit(f'error: {err}')
    page = build(captioner, DecodeSettings.from_args(args), model_line)
    page.launch(server_name=args.host, server_port=args.port, allowed_paths=[os.path.join(HERE, 'png')])


if __name__ == '__main__':
    main()
