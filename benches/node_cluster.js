// Node's own cluster serving the same applications as `netcluster serve --app echo|http`:
// echo (the seeds' protocol: `hello\r\n`, then every byte back) or HTTP/1.1 `hello\n` with
// keep-alive. The comparison point of benches/compare.
//
// Usage: NODE_CLUSTER_SCHED_POLICY=rr|none node benches/node_cluster.js echo|http WORKERS
// Prints `listening on 127.0.0.1:PORT` once every worker listens. SIGUSR2 makes every worker
// print `served PID N` (connections it accepted), for the fairness figures.
'use strict';
const cluster = require('node:cluster');
const net = require('node:net');
const http = require('node:http');

const app = process.argv[2] || 'echo';
const workers = Number(process.argv[3] || 2);

if (cluster.isPrimary) {
  // Port 0 in a cluster: the primary binds once and every worker shares that port.
  for (let i = 0; i < workers; i++) cluster.fork();
  let listening = 0;
  cluster.on('listening', (_worker, address) => {
    listening += 1;
    if (listening === workers) console.log(`listening on 127.0.0.1:${address.port}`);
  });
  process.on('SIGUSR2', () => {
    for (const id in cluster.workers) cluster.workers[id].send('count');
  });
  const stop = () => {
    for (const id in cluster.workers) cluster.workers[id].process.kill('SIGKILL');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  let served = 0;
  let server;
  if (app === 'echo') {
    server = net.createServer((c) => {
      served += 1;
      c.on('error', () => {});
      c.write('hello\r\n');
      c.pipe(c);
    });
  } else {
    server = http.createServer((req, res) => {
      res.end('hello\n');
    });
    server.on('connection', () => {
      served += 1;
    });
  }
  server.listen(0, '127.0.0.1');
  process.on('message', (m) => {
    if (m === 'count') console.log(`served ${process.pid} ${served}`);
  });
}
