"""app.py in a real headless Chromium, driven by Playwright: the page shows what sample.py prints."""
import contextlib
import http.client
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zlib

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from conftest import REPO, run

CHROMIUM = next((path for path in (os.environ.get('CHROMIUM'), shutil.which('chromium'),
                                   shutil.which('chromium-browser'), '/usr/bin/chromium')
                 if path and os.path.exists(path)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason='no Chromium found: apt-get install -y chromium, or set CHROMIUM')
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
         '--no-first-run']


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def checkpoint(two_epoch_model):
    return two_epoch_model / 'checkpoint.pt'


@contextlib.contextmanager
def app_server(checkpoint, folder):
    """app.py serving checkpoint on a free port, its output in folder/app.log and Gradio's own cache, for the
    uploads, in folder/gradio (removed with the test's files); yields the page's URL once it answers."""
    port = free_port()
    with open(folder / 'app.log', 'w+') as log:
        process = subprocess.Popen([sys.executable, 'app.py', '--checkpoint', str(checkpoint), '--port', str(port)],
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, GRADIO_TEMP_DIR=str(folder / 'gradio')))
        try:
            url, deadline = f'http://127.0.0.1:{port}/', time.time() + 300
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError:
                    log.seek(0)
                    assert process.poll() is None and time.time() < deadline, f'app.py did not start:\n{log.read()}'
                    time.sleep(1)
            yield url
        finally:
            process.terminate()
            code = process.wait(timeout=30)
    log = (folder / 'app.log').read_text()
    assert code == -signal.SIGTERM, f'app.py ended with {code} before it was stopped:\n{log[-2000:]}'


@pytest.fixture(scope='module')
def server(checkpoint, tmp_path_factory):
    with app_server(checkpoint, tmp_path_factory.mktemp('app')) as url:
        yield url


@pytest.fixture
def page(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={'width': 1200, 'height': 900})
        page.outside = []  # every request the page makes to another host
        page.on('request',
                lambda r: None if r.url.startswith((server, 'data:', 'blob:')) else page.outside.append(r.url))
        page.goto(server, timeout=120_000)
        page.wait_for_selector('#upload input[type=file]', state='attached', timeout=120_000)
        yield page
        browser.close()


def upload(page, path):
    page.set_input_files('#upload input[type=file]', str(path))


@needs_chromium
def test_page_shows_the_caption_sample_py_prints_and_the_gate_picture(page, synthetic_set, checkpoint, tmp_path):
    image = sorted((synthetic_set / 'val').iterdir())[2]
    printed = run('sample.py', '--image', str(image), '--checkpoint', str(checkpoint))
    assert printed.returncode == 0, printed.stderr
    upload(page, image)
    page.wait_for_function("document.querySelector('#greedy textarea')?.value", timeout=120_000)
    assert page.input_value('#greedy textarea') == printed.stdout.strip()
    picture = page.wait_for_selector('#gates img', timeout=120_000)
    page.wait_for_function('img => img.complete && img.naturalWidth > 0', arg=picture, timeout=60_000)
    assert picture.evaluate('img => img.naturalWidth') >= 700  # the PNG from gates.py, loaded
    beams = page.inner_text('#beams')
    assert 'log p' in beams and len([line for line in beams.splitlines() if line.strip()]) >= 2
    assert page.inner_text('#message').strip() == ''
    assert page.outside == []  # works offline: no CDN fonts or scripts, no analytics
    page.screenshot(path=str(tmp_path / 'page.png'), full_page=True)
    assert (tmp_path / 'page.png').stat().st_size > 10_000


@needs_chromium
def test_unreadable_upload_shows_one_line_and_the_server_keeps_serving(page, synthetic_set, tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a picture' * 10)
    upload(page, bad)
    page.wait_for_function("document.querySelector('#message')?.innerText.includes('error')", timeout=120_000)
    message = page.inner_text('#message').strip()
    assert message.startswith('error: broken.png') and '\n' not in message
    assert 'Traceback' not in page.content()
    page.reload()  # the server keeps serving: a fresh page's upload gets its caption
    page.wait_for_selector('#upload input[type=file]', state='attached', timeout=120_000)
    upload(page, sorted((synthetic_set / 'val').iterdir())[0])
    page.wait_for_function("document.querySelector('#greedy textarea')?.value", timeout=120_000)
    assert page.inner_text('#message').strip() == ''


def huge_png(path, side=20_000):
    """A real PNG of side x side pixels, 1 bit each and all black: 50 MB of pixels in about 50 KB, past
    Pillow's decompression-bomb limit (about 179 million pixels) at 20,000 x 20,000."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    packer, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)  # a filter byte, then the row's bits
    pixels = b''.join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)) +
                     chunk(b'IDAT', pixels) + chunk(b'IEND', b''))
    return path


@needs_chromium
def test_a_huge_a_large_and_an_empty_upload_each_get_one_line_and_the_page_keeps_working(page, synthetic_set,
                                                                                         tmp_path):
    large = tmp_path / 'large.jpg'
    large.write_bytes(os.urandom(30 * 2**20))  # 30 MB that are not an image
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    with pytest.raises(Image.DecompressionBombError, match='400000000 pixels'):
        Image.open(huge_png(tmp_path / 'huge.png'))
    for bad in (tmp_path / 'huge.png', large, empty):
        upload(page, bad)
        page.wait_for_function(f"document.querySelector('#message')?.innerText.includes('{bad.name}')",
                               timeout=120_000)
        message = page.inner_text('#message').strip()
        assert message.startswith(f'error: {bad.name}: ') and '\n' not in message, message
        assert ('too many pixels' in message) == (bad == tmp_path / 'huge.png'), message
        assert page.input_value('#greedy textarea') == '' and 'Traceback' not in page.content()
        page.click('#upload button[aria-label=Clear]')  # the same page, ready for the next upload
        page.wait_for_selector('#upload input[type=file]', state='attached', timeout=60_000)
    upload(page, sorted((synthetic_set / 'val').iterdir())[0])
    page.wait_for_function("document.querySelector('#greedy textarea')?.value", timeout=120_000)
    assert page.inner_text('#message').strip() == ''


@pytest.fixture(scope='module')
def client(server):
    """(gradio_client.Client of the page, a function that captions one file through it as an upload does)."""
    gradio_client = pytest.importorskip('gradio_client')
    client = gradio_client.Client(server, verbose=False)
    endpoint, = client.view_api(return_format='dict', print_info=False)['named_endpoints']  # the upload's

    def submit(path):
        return client.submit(gradio_client.handle_file(str(path)), api_name=endpoint)
    return client, submit


def test_eight_uploads_at_once_are_all_answered(client, synthetic_set):
    _, submit = client
    images = sorted((synthetic_set / 'val').iterdir())[:2]
    one_at_a_time = [submit(image).result(timeout=120)[:2] for image in images]
    assert len(one_at_a_time) == 2 and all(message == '' and caption for message, caption in one_at_a_time)
    jobs = [submit(images[number % 2]) for number in range(8)]  # all eight sent before any is answered
    assert [job.result(timeout=300)[:2] for job in jobs] == one_at_a_time * 4  # each upload its own answer


def test_an_animated_gif_is_captioned_from_its_first_frame(client, synthetic_set, tmp_path):
    _, submit = client
    first, second = (Image.open(path).convert('RGB') for path in sorted((synthetic_set / 'val').iterdir())[2:4])
    gif = tmp_path / 'animated.gif'
    first.save(gif, save_all=True, append_images=[second], duration=200, loop=0)
    with Image.open(gif) as animation:
        assert animation.n_frames == 2
        frames = []
        for number in range(2):
            animation.seek(number)
            frames.append(tmp_path / f'frame{number}.png')
            animation.convert('RGB').save(frames[-1])
    caption, first_caption, second_caption = (submit(path).result(timeout=120)[1] for path in (gif, *frames))
    assert caption == first_caption != second_caption  # the frames differ, and the first is the one captioned


def test_the_page_serves_no_file_outside_png_and_its_cache(server, checkpoint):
    host, port = urllib.parse.urlsplit(server).netloc.split(':')

    def get(path):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        connection.request('GET', path)  # as written: no client-side clean-up of .. or %2f
        response = connection.getresponse()
        return response.status, response.read()

    status, body = get(f'/gradio_api/file={REPO}/png/example.png')  # what the page may serve, it serves
    assert status == 200 and body == (REPO / 'png' / 'example.png').read_bytes()
    secrets = [b'root:x:0:0', *(path.read_bytes()[:100] for path in (REPO / 'README.md', REPO / 'app.py', checkpoint))]
    requests = ['/gradio_api/file=/etc/passwd', '/file=/etc/passwd', '/gradio_api/file=%2fetc%2fpasswd',
                '/file=../README.md', '/gradio_api/file=../README.md', '/gradio_api/file=..%2fREADME.md',
                f'/gradio_api/file={REPO}/README.md', f'/gradio_api/file={REPO}/app.py',
                f'/gradio_api/file={checkpoint}', f'/gradio_api/file={checkpoint.parent}/../{checkpoint.parent.name}',
                f'/gradio_api/file={REPO}/models/../app.py', f'/gradio_api/file={REPO}/png/../app.py',
                f'/gradio_api/file={REPO}/png/..%2fapp.py', f'/gradio_api/file={REPO}/png/%2e%2e/app.py',
                f'/gradio_api/file={REPO}/png%2f..%2fREADME.md', '/gradio_api/file=png/../app.py',
                '/gradio_api/file=png/%2e%2e%2fapp.py', '/gradio_api/file=%252e%252e/app.py',
                '/gradio_api/file=png%5c..%5capp.py', '/static/../app.py', '/assets/..%2f..%2fapp.py',
                '/..%2f..%2f..%2fetc%2fpasswd']
    for request in requests:
        status, body = get(request)
        assert 400 <= status < 500, (request, status)
        assert not any(secret in body for secret in secrets), request


def test_app_without_a_checkpoint_says_how_to_make_one(tmp_path):
    result = run('app.py', '--checkpoint', str(tmp_path / 'best.pt'))
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and 'python demo.py' in result.stderr and 'Traceback' not in result.stderr
