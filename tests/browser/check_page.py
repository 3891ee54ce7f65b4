#!/usr/bin/env python3
"""Check a self-contained HTML report page in headless Chromium.

Usage: check_page.py PAGE.html --screenshot OUT.png [--expect-plots N]
                     [--timeout S] [--chromium PATH]

Loads PAGE over file:// and fails (exit 1) on any network request besides the
page itself, any console error/assert, uncaught exception or error log entry
(CSP violations included), if window.__cortexReady is never set, or if a plot
in window.__cortexPlots drew no points. Always writes a full-page screenshot
when the browser is still alive. Prints one JSON line on stdout; exit 2 means
bad usage or Chromium could not be started. Standard library only.
"""
import argparse, base64, fcntl, json, os, queue, shutil, subprocess, sys
import tempfile, threading, time
from pathlib import Path


class BrowserDied(Exception): pass
class CdpError(Exception): pass


class Browser:
    """Chromium speaking CDP over --remote-debugging-pipe (NUL-framed JSON)."""

    def __init__(self, chromium, on_event):
        self.chromium, self.on_event = chromium, on_event
        self.profile = tempfile.mkdtemp(prefix='check-page-profile-')
        self.errlog = tempfile.TemporaryFile()  # chromium's stderr, for the tail on death
        self.proc, self.wfd, self.rfd = None, None, None
        self.msgs, self.replies, self.next_id, self.dead = queue.Queue(), {}, 0, False

    def start(self):
        flags = ['--headless=new', '--disable-gpu', '--no-first-run',
                 '--no-default-browser-check', '--disable-background-networking',
                 '--disable-extensions', '--disable-sync', '--disable-component-update',
                 '--mute-audio', f'--user-data-dir={self.profile}', '--window-size=1280,900',
                 '--remote-debugging-pipe']
        if os.geteuid() == 0:  # the sandbox refuses to run as root
            flags.append('--no-sandbox')
        # Move all pipe ends to fds >= 10 so that parking the child's ends on
        # 3 and 4 (where Chromium expects them) cannot clobber one of them.
        high = lambda fd: (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10), os.close(fd))[0]
        cmd_r, self.wfd = map(high, os.pipe())   # we write commands, it reads fd 3
        self.rfd, out_w = map(high, os.pipe())   # it writes replies to fd 4
        err = high(os.dup(self.errlog.fileno()))  # its fd may be 3 or 4 itself
        saved = {}
        for fd in (3, 4):  # keep whatever this process has on 3/4
            try: saved[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            except OSError: pass
        try:
            os.dup2(cmd_r, 3); os.dup2(out_w, 4)
            self.proc = subprocess.Popen([self.chromium, *flags, 'about:blank'], pass_fds=(3, 4),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True)
        finally:
            for fd in (3, 4):
                if fd in saved: os.dup2(saved[fd], fd, inheritable=False); os.close(saved[fd])
                else: os.close(fd)
            os.close(cmd_r); os.close(out_w); os.close(err)  # EOF on rfd now means Chromium is gone
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b''
        try:
            while chunk := os.read(self.rfd, 1 << 16):
                *frames, buf = (buf + chunk).split(b'\0')
                for f in frames:
                    self.msgs.put(json.loads(f))
        except (OSError, ValueError): pass
        finally: self.msgs.put(None)  # EOF (or garbage): the browser is gone for us

    def stderr_tail(self, n=1500):
        self.errlog.seek(0)
        lines = self.errlog.read().decode(errors='replace').splitlines()
        return '\n'.join(l for l in lines if 'dbus' not in l)[-n:].strip()  # dbus noise is harmless

    def pump(self, deadline):
        """Handle one message (reply or event); False if none came before deadline."""
        if self.dead:
            raise BrowserDied(f'chromium exited; stderr tail:\n{self.stderr_tail()}')
        try: m = self.msgs.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty: return False
        if m is None:
            self.dead = True
            try: self.proc.wait(timeout=5)  # so the stderr tail is complete
            except subprocess.TimeoutExpired: pass
            return self.pump(deadline)
        if 'id' in m: self.replies[m['id']] = m
        else: self.on_event(m)
        return True

    def call(self, method, params=None, session=None, deadline=None):
        self.next_id += 1
        msg = {'id': self.next_id, 'method': method, 'params': params or {}}
        if session: msg['sessionId'] = session
        try: os.write(self.wfd, json.dumps(msg).encode() + b'\0')
        except OSError: self.dead = True  # broken pipe: pump() reports it with the stderr tail
        while self.next_id not in self.replies:
            if not self.pump(deadline) and time.monotonic() >= deadline:
                raise TimeoutError(f'no reply to {method}')
        r = self.replies.pop(self.next_id)
        if 'error' in r: raise CdpError(f"{method}: {r['error'].get('message')}")
        return r.get('result', {})

    def close(self):
        try:
            if self.proc and self.proc.poll() is None and not self.dead:
                try: self.call('Browser.close', deadline=time.monotonic() + 2)
                except Exception: pass
            if self.proc:
                try: self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired: pass
                try: os.killpg(self.proc.pid, 9)  # also any renderer left behind
                except ProcessLookupError: pass
                self.proc.wait()
        finally:
            for fd in (self.wfd, self.rfd):
                if fd is not None: os.close(fd)
            shutil.rmtree(self.profile, ignore_errors=True)


def arg_text(a):
    """Readable text of a console argument (a CDP RemoteObject)."""
    if 'value' in a: return a['value'] if isinstance(a['value'], str) else json.dumps(a['value'])
    return a.get('description') or a.get('unserializableValue') or a.get('type', '?')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])  # usage errors exit 2
    ap.add_argument('page'); ap.add_argument('--screenshot', required=True)
    ap.add_argument('--expect-plots', type=int, default=0)
    ap.add_argument('--timeout', type=float, default=30.0)
    ap.add_argument('--chromium', default='/usr/bin/chromium')
    args = ap.parse_args()
    page = Path(args.page).resolve()
    if not page.is_file(): ap.error(f'no such page: {page}')
    if args.timeout <= 0 or args.expect_plots < 0: ap.error('--timeout and --expect-plots must be positive')
    if not (os.path.isfile(args.chromium) and os.access(args.chromium, os.X_OK)):
        ap.error(f'chromium not found or not executable: {args.chromium}')
    page_url = page.as_uri()
    res = {'page': str(page), 'plots': {}, 'requests': [], 'console_errors': [],
           'screenshot': None, 'ok': False}
    failures, state, session, ready = [], {'loaded': False}, None, False

    def on_event(m):
        if m.get('sessionId') != session: return  # only our page's events
        meth, p = m.get('method'), m.get('params', {})
        if meth == 'Network.requestWillBeSent':  # anything but the page itself is a leak
            if p['request']['url'].split('#')[0] != page_url: res['requests'].append(p['request']['url'])
        elif meth == 'Runtime.consoleAPICalled' and p.get('type') in ('error', 'assert'):
            res['console_errors'].append(f"console.{p['type']}: " + ' '.join(arg_text(a) for a in p.get('args', [])))
        elif meth == 'Runtime.exceptionThrown':
            d = p['exceptionDetails']
            res['console_errors'].append('uncaught: ' + (d.get('exception', {}).get('description') or d.get('text', '')))
        elif meth == 'Log.entryAdded' and p['entry'].get('level') == 'error':
            e = p['entry']  # CSP violations and failed loads arrive here
            res['console_errors'].append(f"log[{e.get('source')}]: {e.get('text')}" + (f" ({e['url']})" if e.get('url') else ''))
        elif meth == 'Page.loadEventFired': state['loaded'] = True
        elif meth == 'Inspector.targetCrashed': failures.append('renderer crashed')

    b = Browser(args.chromium, on_event)
    t0 = time.monotonic()
    overall = t0 + args.timeout + 30  # hard bound on the whole run
    try:
        try:  # everything up to an attached page counts as "cannot start"
            b.start()
            for _ in range(50):  # the about:blank page target may take a moment to appear
                pages = [t for t in b.call('Target.getTargets', deadline=t0 + 20)['targetInfos'] if t['type'] == 'page']
                if pages: break
                time.sleep(0.1)
            else: raise CdpError('no page target')
            session = b.call('Target.attachToTarget', {'targetId': pages[0]['targetId'], 'flatten': True},
                             deadline=t0 + 20)['sessionId']
        except (OSError, BrowserDied, TimeoutError, CdpError) as e:
            tail = '' if isinstance(e, BrowserDied) else f'; stderr tail:\n{b.stderr_tail()}'  # BrowserDied has it
            print(f'check_page: cannot start chromium ({args.chromium}): {e}{tail}', file=sys.stderr)
            return 2
        cmd = lambda meth, params=None, dl=overall: b.call(meth, params, session, min(dl, overall))
        evaluate = lambda expr, dl=overall, **kw: cmd('Runtime.evaluate', {'expression': expr, 'returnByValue': True, **kw}, dl)['result'].get('value')
        try:
            for d in ('Network', 'Runtime', 'Log', 'Page'): cmd(f'{d}.enable')
            ready_by = time.monotonic() + args.timeout  # --timeout covers load + charts
            nav = cmd('Page.navigate', {'url': page_url}, ready_by)
            if nav.get('errorText'): failures.append(f"navigation failed: {nav['errorText']}")
            while not state['loaded'] and time.monotonic() < ready_by: b.pump(min(ready_by, time.monotonic() + 0.1))
            if not state['loaded']: failures.append('load event never fired')
            while state['loaded'] and not ready and time.monotonic() < ready_by:
                ready = evaluate('window.__cortexReady === true', ready_by) is True
                if not ready:  # wait 100 ms, handling events meanwhile
                    pause = time.monotonic() + 0.1
                    while b.pump(pause): pass
            if not ready: failures.append('page never set window.__cortexReady')
            else:
                plots = json.loads(evaluate('JSON.stringify(window.__cortexPlots || {})') or '{}')
                if isinstance(plots, dict): res['plots'] = plots
                else: failures.append('window.__cortexPlots is not an object')
                empty = sorted(k for k, v in res['plots'].items() if not (isinstance(v, (int, float)) and v > 0))
                if empty: failures.append(f"plots with no data points: {', '.join(empty)}")
                if len(res['plots']) < args.expect_plots:
                    failures.append(f"expected at least {args.expect_plots} plots, page reported {len(res['plots'])}")
        except (BrowserDied, TimeoutError, CdpError) as e:
            failures.append(f'checking the page failed: {e}')
        if not b.dead:  # screenshot even after failures: it helps debugging
            try:
                shot_by = min(overall, time.monotonic() + (15 if ready else 5))  # a hung page won't answer
                height = min(int(evaluate('document.documentElement.scrollHeight', shot_by) or 900), 20000)
                cmd('Emulation.setDeviceMetricsOverride', {'width': 1280, 'height': max(height, 1),
                    'deviceScaleFactor': 1, 'mobile': False}, shot_by)
                # let responsive charts re-layout and repaint at the new size
                evaluate('new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))', shot_by, awaitPromise=True)
                png = base64.b64decode(cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True}, shot_by)['data'])
                out = Path(args.screenshot).resolve()
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(png)
                res['screenshot'] = str(out)
            except (BrowserDied, TimeoutError, CdpError, OSError, ValueError) as e:
                failures.append(f'screenshot failed: {e}')
        # Late events (e.g. errors raised by the final layout) still count.
        try:
            while b.pump(time.monotonic() + 0.05): pass
        except BrowserDied: pass
    finally:
        b.close()
    failures += [f'network request: {u}' for u in res['requests']]
    failures += [f'console error: {t}' for t in res['console_errors']]
    res['ok'] = not failures
    res['failures'] = failures
    print(json.dumps(res))
    for f in failures: print(f'FAIL {page.name}: {f}', file=sys.stderr)
    return 0 if res['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
