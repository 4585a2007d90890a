// The terminal page's script (served as ./assets/terminal.js).
import { Terminal } from './xterm/lib/xterm.mjs';

const state = document.getElementById('state');
const params = new URLSearchParams(location.search);
// vmhost fills this in when it serves the page.
const provider = document.querySelector('meta[name="vmhost-provider"]').content;
const session = params.get('session') || '';
const base = location.pathname.replace(/\/terminal$/, '');
const term = new Terminal({ cursorBlink: true, convertEol: false });
term.open(document.getElementById('term'));
window.vmhost = { connected: false, output: '' };
const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
const ws = new WebSocket(`${scheme}://${location.host}${base}/ucloud/${encodeURIComponent(provider)}/websocket?session=${encodeURIComponent(session)}`);
ws.onopen = () => ws.send(JSON.stringify({ type: 'initialize', sessionIdentifier: session, cols: term.cols, rows: term.rows }));
ws.onmessage = (m) => {
  const frame = JSON.parse(m.data);
  const payload = frame.payload || {};
  if (payload.type === 'initialize') {
    window.vmhost.connected = true;
    state.textContent = 'Connected to the serial console (press Enter for a prompt)';
  } else if (payload.type === 'data') {
    window.vmhost.output += payload.data;
    term.write(payload.data);
  } else if (frame.type === 'response' && frame.status !== 200) {
    state.textContent = (payload.why || 'The session was refused');
  }
};
ws.onclose = (e) => { state.textContent = `Disconnected${e.reason ? ': ' + e.reason : ''}`; };
term.onData((data) => ws.readyState === 1 && ws.send(JSON.stringify({ type: 'input', data })));
term.onResize(({ cols, rows }) => ws.readyState === 1 && ws.send(JSON.stringify({ type: 'resize', cols, rows })));
