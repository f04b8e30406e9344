// The Node.js example app (examples/node-worker/app.js), growing its memory by about 4 MB a
// second and keeping it: a leak for --max-rss to catch.
'use strict';
const kept = [];
setInterval(() => {
  const b = Buffer.alloc(4 * 1024 * 1024, 1);
  kept.push(b);
}, 1000);
require('../../examples/node-worker/app.js');
