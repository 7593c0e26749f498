// The interleaf playground: a chat with images, streamed from /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { messages: [], attachments: [], model: null, busy: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = "model: " + state.model;
  return state.model;
}

// -- attachments --
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) { setStatus(`${file.name || "file"} is not an image`); continue; }
    state.attachments.push(await readAsDataURL(file));
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((url, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `attached image ${i + 1}`;
    img.className = "thumbnail";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove";
    remove.onclick = () => { state.attachments.splice(i, 1); renderAttachments(); };
    figure.append(img, remove);
    box.append(figure);
  });
}

// -- history --
function addBubble(role, text, images) {
  const li = document.createElement("li");
  li.className = "message " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image";
    li.append(img);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  li.append(span);
  $("history").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

// -- server-sent events --
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(event) {
  if (event) event.preventDefault();
  if (state.busy) return;
  const text = $("prompt").value.trim();
  if (!text && state.attachments.length === 0) return;
  state.busy = true;
  $("send").disabled = true;
  const images = state.attachments.slice();
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  const userMessage = { role: "user", content };
  addBubble("user", text, images);
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  const bubble = addBubble("assistant", "");
  const out = bubble.querySelector(".text");
  bubble.dataset.state = "streaming";
  bubble.dataset.chunks = "0";
  setStatus("generating…");
  try {
    const model = state.model || (await loadModel());
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model,
        messages: state.messages.concat([userMessage]),
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number($("max-tokens").value) || 64,
        temperature: Number($("temperature").value),
        top_p: Number($("top-p").value) || 1,
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    let usage = null;
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          out.textContent += piece;
          bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
        }
      }
    }
    state.messages.push(userMessage, { role: "assistant", content: out.textContent });
    bubble.dataset.state = "done";
    setStatus(usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "done");
  } catch (err) {
    bubble.classList.add("error");
    bubble.dataset.state = "error";
    out.textContent = "Error: " + err.message;
    setStatus("");
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

function reset() {
  state.messages = [];
  state.attachments = [];
  $("history").replaceChildren();
  renderAttachments();
  setStatus("new conversation");
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) send(e);
});
$("image-input").addEventListener("change", async (e) => {
  await attachFiles(Array.from(e.target.files));
  e.target.value = "";
});
document.addEventListener("paste", async (e) => {
  const files = Array.from(e.clipboardData ? e.clipboardData.files : []);
  if (files.length) { e.preventDefault(); await attachFiles(files); }
});
$("reset").addEventListener("click", reset);
$("api-key").addEventListener("change", () => { state.model = null; loadModel().catch((e) => setStatus(e.message)); });
loadModel().catch((e) => setStatus("could not list models: " + e.message));
