// Times WebAssembly models side by side in one Node process: sparsecc's model.js builds and
// onnxruntime-web (wasm backend, SIMD, 1 thread) sessions, in interleaved rounds.
//
// Usage: node wasm_node_timing.js JOB.json   (written by benchmarks/wasm_models.py)
// JOB: {"ort_dir": node_modules folder holding onnxruntime-web, "rounds": N, "block_ms": ms,
//       "entries": [{"name", "kind": "ort" | "sparsecc", "path": model.onnx | model.js,
//                    "inputs": [{"file", "dtype", "shape"}], "output": file for the first output}]}
// Prints one JSON object: name -> {"median_ms", "p25_ms", "p75_ms", "calls_per_block"}.
"use strict";
const fs = require("fs");
const path = require("path");

const ARRAYS = { float32: Float32Array, int64: BigInt64Array, int32: Int32Array };

function readInput(spec) {
  const bytes = fs.readFileSync(spec.file);
  const Kind = ARRAYS[spec.dtype];
  if (!Kind) throw new Error("unsupported input dtype " + spec.dtype);
  return new Kind(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * (sorted.length - 1) + 0.5))];
}

async function prepare(entry, ort) {
  const inputs = entry.inputs.map(readInput);
  if (entry.kind === "sparsecc") {
    const model = await require(path.resolve(entry.path)).load();
    return { call: async () => model.run(...inputs) };
  }
  const session = await ort.InferenceSession.create(fs.readFileSync(entry.path), { executionProviders: ["wasm"] });
  const feeds = {};
  session.inputNames.forEach((name, i) => {
    feeds[name] = new ort.Tensor(entry.inputs[i].dtype, inputs[i], entry.inputs[i].shape);
  });
  return {
    call: async () => {
      const out = await session.run(feeds);
      return session.outputNames.map((n) => out[n].data);
    },
  };
}

async function main() {
  const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const ort = require(path.join(job.ort_dir, "onnxruntime-web"));
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.simd = true;
  const runs = [];
  for (const entry of job.entries) {
    const run = await prepare(entry, ort);
    const outputs = await run.call(); // warm up, and keep the first output for the numerics check
    if (entry.output) {
      const first = outputs[0];
      fs.writeFileSync(entry.output, Buffer.from(first.buffer, first.byteOffset, first.byteLength));
    }
    const t0 = performance.now();
    await run.call();
    const once = performance.now() - t0;
    runs.push({ entry, run, reps: Math.max(1, Math.round(job.block_ms / Math.max(once, 1e-3))), samples: [] });
  }
  for (let round = 0; round < job.rounds; round++) {
    for (const r of runs) {
      const t0 = performance.now();
      for (let i = 0; i < r.reps; i++) await r.run.call();
      r.samples.push((performance.now() - t0) / r.reps);
    }
  }
  const result = {};
  for (const r of runs) {
    const s = r.samples.slice().sort((a, b) => a - b);
    result[r.entry.name] = { median_ms: quantile(s, 0.5), p25_ms: quantile(s, 0.25), p75_ms: quantile(s, 0.75),
                             calls_per_block: r.reps };
  }
  console.log(JSON.stringify(result));
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : String(err));
  process.exit(1);
});
