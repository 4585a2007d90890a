// The console page's script (served as ./assets/console.js).
import RFB from './novnc/core/rfb.js';

const state = document.getElementById('state');
const show = (text, kind) => { state.textContent = text; state.className = kind || ''; };
const params = new URLSearchParams(location.search);
// vmhost fills this in when it serves the page.
const provider = document.querySelector('meta[name="vmhost-provider"]').content;
const token = params.get('token') || '';
// The page lives at <base>/console; everything else is relative to <base>.
const base = location.pathname.replace(/\/console$/, '');
const explain = async () => {
  try {
    const r = await fetch(`${base}/api/console/status?token=${encodeURIComponent(token)}`);
    const body = await r.json();
    return body.why || '';
  } catch (e) { return ''; }
};
window.vmhost = { connected: false, disconnected: false };

const why = await explain();
if (why) {
  show(why, 'bad');
} else {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const url = `${scheme}://${location.host}${base}/ucloud/${encodeURIComponent(provider)}/vnc?token=${encodeURIComponent(token)}`;
  const rfb = new RFB(document.getElementById('screen'), url, { credentials: { password: params.get('password') || '' } });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.addEventListener('connect', () => {
    window.vmhost.connected = true;
    show('Connected', 'ok');
    document.getElementById('cad').disabled = false;
    document.getElementById('paste').disabled = false;
  });
  rfb.addEventListener('disconnect', (e) => {
    window.vmhost.disconnected = true;
    document.getElementById('cad').disabled = true;
    document.getElementById('paste').disabled = true;
    show(e.detail.clean ? 'Disconnected: the console was closed' : 'Disconnected: the connection was lost', 'bad');
  });
  rfb.addEventListener('securityfailure', (e) => show(`VNC security failure: ${e.detail.reason || e.detail.status}`, 'bad'));
  document.getElementById('cad').onclick = () => rfb.sendCtrlAltDel();
  const dialog = document.getElementById('paste-dialog');
  document.getElementById('paste').onclick = () => dialog.showModal();
  dialog.addEventListener('close', () => {
    if (dialog.returnValue !== 'type') return;
    // QEMU's VNC server has no clipboard; typing the text works with every guest.
    for (const ch of document.getElementById('paste-text').value) {
      if (ch === '\n') { rfb.sendKey(0xff0d, 'Enter'); continue; }
      const code = ch.codePointAt(0);
      rfb.sendKey(code < 0x100 ? code : 0x01000000 + code);
    }
  });
  window.vmhost.rfb = rfb;
}
