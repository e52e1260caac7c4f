"""app.py in a real headless Chromium, driven by Playwright: the page shows what sample.py prints."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from playwright.sync_api import sync_playwright

import train as trainer
from conftest import REPO, learning_args, run

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
def checkpoint(synthetic_set, tmp_path_factory):
    model_path = tmp_path_factory.mktemp('app_model')
    trainer.train(learning_args(synthetic_set, model_path, '--num_epochs', '2'))
    return model_path / 'checkpoint.pt'


@pytest.fixture(scope='module')
def server(checkpoint, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp('app_log') / 'app.log', 'w+')
    process = subprocess.Popen([sys.executable, 'app.py', '--checkpoint', str(checkpoint), '--port', str(port)],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f'http://127.0.0.1:{port}/'
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            log.seek(0)
            assert process.poll() is None and time.time() < deadline, f'app.py did not start:\n{log.read()}'
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


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


def test_app_without_a_checkpoint_says_how_to_make_one(tmp_path):
    result = run('app.py', '--checkpoint', str(tmp_path / 'best.pt'))
    assert result.returncode == 1
    assert result.stderr.count('\n') == 1 and 'python demo.py' in result.stderr and 'Traceback' not in result.stderr
