// Bundles the page into dist/ (index.html + main.js) with esbuild. The generated client in
// src/gen must exist first: `npm run generate` (buf + protoc-gen-es from node_modules).
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

await rm("dist", { recursive: true, force: true });
await mkdir("dist");
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  format: "esm",
  target: "chrome120",
  outfile: "dist/main.js",
  sourcemap: true,
  logLevel: "warning",
});
await copyFile("index.html", "dist/index.html");
console.log("built dist/index.html and dist/main.js");
