// The page: choose or drop an image, post it to /predict and /explain, draw the bars and the overlay.
const $ = (id) => document.getElementById(id);

fetch("/model").then((r) => r.json()).then((m) => {
  const int8 = m.int8 ? ", int8" : "";
  $("model").textContent = `${m.name}: ${m.classes.length} classes, ${m.input_size.join("x")} input, ` +
    `${m.params.toLocaleString()} parameters${int8}`;
});

async function post(path, file) {
  const form = new FormData();
  form.append("file", file);
  const r = await fetch(path, { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) throw new Error(`${r.status}: ${body.detail}`);
  return body;
}

async function classify(file) {
  $("error").hidden = true;
  $("preview").src = URL.createObjectURL(file);
  $("overlay").hidden = true;
  try {
    const res = await post("/predict", file);
    $("top1").textContent = res.top[0].label;
    $("bars").replaceChildren(...res.top.map((t) => {
      const li = document.createElement("li");
      const pct = (100 * t.prob).toFixed(1);
      li.innerHTML = `<div class="row"><span></span><span>${pct}%</span></div>` +
        `<div class="bar" style="width:${pct}%"></div>`;
      li.querySelector("span").textContent = t.label;
      return li;
    }));
    $("latency").textContent = `answered in ${res.latency_ms.toFixed(1)} ms by ${res.model}`;
    $("result").hidden = false;
    const ex = await post("/explain", file);
    $("overlay").src = ex.overlay;
    $("overlay").hidden = !$("show-overlay").checked;
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
  }
}

$("file").addEventListener("change", (e) => e.target.files[0] && classify(e.target.files[0]));
$("show-overlay").addEventListener("change", (e) => { $("overlay").hidden = !e.target.checked || !$("overlay").src; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});
