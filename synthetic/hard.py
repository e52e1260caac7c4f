"""The hard shapes set (python -m synthetic --hard): one to four shapes per image, more attributes,
spatial relations and counts, and five references per image that differ in wording and order.

An object is (size, fill, colour, shape); identical objects are counted ("two big red circles").
A reference lists the groups of identical objects in a random order, with synonyms for sizes, fills
and relations, and, when its first two groups are single objects, often says where one is relative
to the other ("to the left of", "above", "under", "next to"...). parse_caption reads back which
objects a caption names, whatever the wording, so content_matches can score a caption.
"""
from synthetic import easy
from synthetic.draw import apart, background, box, pick, shade

VERSION = 1  # bump when the images or captions change, so cached sets are made again
# It draws as the easy set does, so the easy set's version is recorded too; 'hard' tells the kinds apart.
PARAMETERS = {'version': easy.VERSION, 'hard': VERSION}
DESCRIPTION = 'synthetic shapes, hard'
SHAPES = ('circle', 'square', 'triangle', 'diamond')
COLOURS = dict(easy.COLOURS, orange=(245, 130, 20))
SIZES = {'small': (10, 13), 'large': (17, 21)}  # diameter range in pixels at 64 x 64
FILLS = ('solid', 'hollow')
SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
FILL_WORDS = {'solid': ('',), 'hollow': ('hollow', 'outlined')}
COUNT_WORDS = {1: 'a', 2: 'two', 3: 'three', 4: 'four'}
RELATION_WORDS = {'left': ('to the left of', 'left of'), 'right': ('to the right of', 'right of'),
                  'above': ('above', 'over'), 'below': ('below', 'under'), 'near': ('next to', 'beside')}
OPENINGS = ('{}', 'there {} {}', 'a picture of {}', 'an image with {}', 'this image shows {}')
REPEAT = 0.35  # chance that an object copies an earlier one's attributes, so counts are common


def attributes(obj):
    return obj['size'], obj['fill'], obj['colour'], obj['shape']


def random_scene(rng, size=64):
    """One to four objects, inside the image and at least 2 px apart (at 64 px), sorted left to right."""
    scale, count = size / 64, int(rng.integers(1, 5))
    while True:  # a crowded scene that does not fit is drawn again from scratch
        objects = []
        for _ in range(count):
            if objects and rng.random() < REPEAT:
                size_name, fill, colour, shape = attributes(pick(rng, objects))
            else:
                size_name, fill, colour, shape = (pick(rng, list(SIZES)), pick(rng, FILLS),
                                                  pick(rng, list(COLOURS)), pick(rng, SHAPES))
            diameter = int(round(rng.uniform(*SIZES[size_name]) * scale))
            low, high = diameter // 2 + 1, size - 1 - diameter + diameter // 2
            for _ in range(50):
                obj = {'shape': shape, 'colour': colour, 'size': size_name, 'fill': fill, 'diameter': diameter,
                       'x': int(rng.integers(low, high + 1)), 'y': int(rng.integers(low, high + 1))}
                if all(apart(box(obj), box(other), 2 * scale) for other in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == count:
            return sorted(objects, key=lambda obj: obj['x'])


def render_image(objects, rng, size=64):
    """Light flat or noisy background; solid shapes filled, hollow ones drawn as a 2 px outline (at 64 px)."""
    image, draw = background(rng, size)
    width = max(1, round(2 * size / 64))
    for obj in objects:
        colour = shade(COLOURS[obj['colour']], rng)
        style = {'fill': colour} if obj['fill'] == 'solid' else {'outline': colour, 'width': width}
        x0, y0, x1, y1 = box(obj)
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        if obj['shape'] == 'circle':
            draw.ellipse((x0, y0, x1, y1), **style)
        elif obj['shape'] == 'square':
            draw.rectangle((x0, y0, x1, y1), **style)
        elif obj['shape'] == 'triangle':
            draw.polygon([(x0, y1), (x1, y1), (xm, y0)], **style)
        else:
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], **style)
    return image


def groups_of(objects):
    """[(attributes, [objects])] for each kind of object, in order of first appearance."""
    groups = {}
    for obj in objects:
        groups.setdefault(attributes(obj), []).append(obj)
    return list(groups.items())


def relations(a, b, scale=1.0):
    """The ways to say where object a is relative to b: the main direction, and 'near' when they are close."""
    dx, dy = a['x'] - b['x'], a['y'] - b['y']
    found = [('left' if dx < 0 else 'right') if abs(dx) >= abs(dy) else ('above' if dy < 0 else 'below')]
    gap = max(abs(dx), abs(dy)) - (a['diameter'] + b['diameter']) / 2
    if gap <= 6 * scale:
        found.append('near')
    return found


def phrase(group, rng):
    (size, fill, colour, shape), members = group
    words = [COUNT_WORDS[len(members)], pick(rng, SIZE_WORDS[size]), pick(rng, FILL_WORDS[fill]), colour,
             shape + ('s' if len(members) > 1 else '')]
    return ' '.join(word for word in words if word)


def one_caption(objects, rng, size=64):
    groups = groups_of(objects)
    groups = [groups[i] for i in rng.permutation(len(groups))]
    parts = [phrase(group, rng) for group in groups]
    if len(groups) >= 2 and len(groups[0][1]) == len(groups[1][1]) == 1 and rng.random() < 0.6:
        relation = pick(rng, relations(groups[0][1][0], groups[1][1][0], size / 64))
        parts[:2] = [f'{parts[0]} {pick(rng, RELATION_WORDS[relation])} {parts[1]}']
    body = parts[0] if len(parts) == 1 else ' , '.join(parts[:-1]) + ' and ' + parts[-1]
    opening = pick(rng, OPENINGS)
    if opening.startswith('there'):
        return opening.format('is' if len(groups[0][1]) == 1 else 'are', body) + ' .'
    return opening.format(body) + ' .'


def captions_for(objects, rng, n=5, size=64):
    """n references, distinct where the scene allows it (a few draws), each naming every object."""
    captions = []
    for _ in range(20 * n):
        caption = one_caption(objects, rng, size)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n:
            return captions
    return [captions[i % len(captions)] for i in range(n)]


def parse_caption(caption):
    """The objects a caption names, as sorted (size, fill, colour, shape) tuples, one per object counted."""
    words = caption.split() if isinstance(caption, str) else list(caption)
    words = [word.lower().strip('.,;:!?') for word in words]
    size_of = {word: size for size, synonyms in SIZE_WORDS.items() for word in synonyms}
    fill_of = {word: fill for fill, synonyms in FILL_WORDS.items() for word in synonyms if word}
    number = {word: n for n, word in COUNT_WORDS.items()}
    found, i = [], 0
    while i < len(words):
        if words[i] in size_of:
            j, fill = i + 1, 'solid'
            if j < len(words) and words[j] in fill_of:
                fill, j = fill_of[words[j]], j + 1
            if j + 1 < len(words) and words[j] in COLOURS:
                count = number.get(words[i - 1], 1) if i > 0 else 1
                shape = words[j + 1][:-1] if count > 1 and words[j + 1].endswith('s') else words[j + 1]
                if shape in SHAPES:
                    found += [(size_of[words[i]], fill, words[j], shape)] * count
                    i = j + 2
                    continue
        i += 1
    return tuple(sorted(found))


def content_matches(caption, objects):
    """True if the caption names exactly the objects with their counts; extra or missing ones fail."""
    return parse_caption(caption) == tuple(sorted(attributes(obj) for obj in objects))
