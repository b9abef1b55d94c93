// ONNX Runtime's side of benchmarks/torch_yolo.py: runs an exported network with
// onnxruntime-node (CPU provider), one input "images" [1, 3, SIZE, SIZE], output "pred".
//
//   node ort_time.js MODEL.onnx SIZE THREADS SECONDS          median ms of repeated runs (JSON)
//   node ort_time.js MODEL.onnx SIZE THREADS IN.f32 OUT.f32   one run on IN (raw float32),
//                                                             pred written to OUT (raw float32)
//
// onnxruntime-node is found through NODE_PATH (torch_yolo.py --ort DIR sets it to
// DIR/node_modules; `npm install --ignore-scripts onnxruntime-node` there: the CPU
// library ships in the package, its install script only fetches GPU parts).
const fs = require('fs');
const ort = require('onnxruntime-node');

async function main() {
  const [model, size, threads] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
  const session = await ort.InferenceSession.create(model, {
    intraOpNumThreads: threads, interOpNumThreads: 1, executionMode: 'sequential', graphOptimizationLevel: 'all'});
  const shape = [1, 3, size, size];
  if (process.argv.length > 6) {
    const bytes = fs.readFileSync(process.argv[5]);
    const x = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4);
    const out = await session.run({images: new ort.Tensor('float32', x, shape)});
    fs.writeFileSync(process.argv[6], Buffer.from(out.pred.data.buffer, out.pred.data.byteOffset, out.pred.data.byteLength));
    return;
  }
  const seconds = Number(process.argv[5]);
  const x = new Float32Array(3 * size * size).map(() => Math.random());
  const feeds = {images: new ort.Tensor('float32', x, shape)};
  await session.run(feeds);  // warm-up
  const times = [];
  const start = process.hrtime.bigint();
  while (Number(process.hrtime.bigint() - start) / 1e9 < seconds || times.length < 5) {
    const t = process.hrtime.bigint();
    await session.run(feeds);
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({median_ms: times[times.length >> 1], runs: times.length, version: ort.env.versions.common}));
}

main().catch((e) => {
  console.error('ort_time.js: ' + e.message);
  process.exit(1);
});
