// The comparison point for benches/cluster_http.sh: Node's own cluster serving the same
// HTTP "hello\n" as examples/cluster_http.rs.
// Usage: NODE_CLUSTER_SCHED_POLICY=rr|none node benches/node_cluster_http.js WORKERS PORT
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const workers = Number(process.argv[2] || 2);
const port = Number(process.argv[3] || 8080);

if (cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
  let listening = 0;
  cluster.on('listening', () => {
    listening += 1;
    if (listening === workers) console.log(`listening on 127.0.0.1:${port}`);
  });
  const stop = () => {
    for (const id in cluster.workers) cluster.workers[id].kill();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  http
    .createServer((req, res) => {
      res.end('hello\n');
    })
    .listen(port, '127.0.0.1');
}
