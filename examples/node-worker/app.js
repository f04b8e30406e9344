// An HTTP app run by netcluster as any program would be:
//
//   netcluster serve --workers 4 --listen 127.0.0.1:8080 -- node examples/node-worker/app.js
//
// It listens on the socket netcluster passes at descriptor 3 (`listen({fd: 3})`, as under
// systemd socket activation), says it is ready with `systemd-notify --ready` on the
// NOTIFY_SOCKET netcluster gives it, and on SIGTERM stops without losing a request: every
// response from then on says `Connection: close`, the server stops accepting, and a keep-alive
// connection still idle after a second is closed (closing idle connections at once would race
// with a client sending its next request on one).
'use strict';

const http = require('node:http');
const { execFile } = require('node:child_process');

const IDLE_GRACE_MS = 1000;
let draining = false;

const server = http.createServer((req, res) => {
  const answer = () => {
    if (draining) res.setHeader('Connection', 'close');
    res.setHeader('Content-Type', 'text/plain');
    res.end(`hello from ${process.pid}\n`);
  };
  // `GET /slow?ms=N` answers after N milliseconds (at most 10 s): a request in flight.
  const slow = /^\/slow\?ms=(\d+)$/.exec(req.url || '');
  if (slow) setTimeout(answer, Math.min(Number(slow[1]), 10000));
  else answer();
});
server.keepAliveTimeout = 5000;

function notify(...args) {
  if (!process.env.NOTIFY_SOCKET) return;
  execFile('systemd-notify', args, (err) => {
    // systemd-notify exits non-zero when its barrier is not answered; the message was sent.
    if (err && err.code === 'ENOENT') {
      console.error('systemd-notify is not installed: cannot say READY=1 (use --ready-after)');
    }
  });
}

const fds = Number(process.env.LISTEN_FDS || 0);
if (fds < 1 || process.env.LISTEN_PID !== String(process.pid)) {
  console.error(`no listener passed (LISTEN_FDS=${fds}, LISTEN_PID=${process.env.LISTEN_PID})`);
  process.exit(1);
}

server.listen({ fd: 3 }, () => {
  notify('--ready', `--status=serving ${process.env.LISTEN_FDNAMES || 'fd 3'}`);
});

process.on('SIGTERM', () => {
  draining = true;
  notify('--status=draining');
  // Stop accepting (net.Server's close: unlike http.Server's since Node 19, it leaves idle
  // keep-alive connections alone), then close what is still idle after the grace.
  require('node:net').Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => server.closeIdleConnections(), IDLE_GRACE_MS).unref();
});
