// Builds the web app into dist/: the bundled script (the SDK included), the page and its
// stylesheet. `courier serve --web-dir clients/web/dist` serves it at `/`.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist");
await build({
  entryPoints: ["src/main.ts"],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: true,
  outfile: "dist/app.js",
  logLevel: "warning",
});
for (const file of ["index.html", "style.css", "favicon.svg"]) copyFileSync(`src/${file}`, `dist/${file}`);
console.log("built dist/ (index.html, app.js, style.css, favicon.svg)");
