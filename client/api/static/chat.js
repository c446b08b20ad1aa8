// The chat page: keeps the conversation, streams each answer from /v1/chat/completions (server-sent
// events), and shows the servers that computed it (the response's non-standard "stamen" field).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, messages: [], busy: false };

function scrollDown() {
  const main = $("messages");
  main.scrollTop = main.scrollHeight;
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  message.append(content);
  $("messages").append(message);
  scrollDown();
  return message;
}

function showRoute(message, route) {
  const box = document.createElement("div");
  box.className = "route";
  box.append(`Answered by ${route.length} server${route.length === 1 ? "" : "s"}: `);
  const list = document.createElement("ol");
  for (const hop of route) {
    const item = document.createElement("li");
    item.dataset.peerId = hop.peer_id;
    item.title = `peer ${hop.peer_id}`;
    const name = document.createElement("strong");
    name.textContent = hop.public_name || "unnamed";
    const peer = document.createElement("code");
    peer.textContent = `…${hop.peer_id.slice(-8)}`;
    item.append(name, " (", peer, `) blocks ${hop.blocks}`);
    list.append(item);
  }
  box.append(list);
  message.append(box);
}

// Reads server-sent events from a fetch response; calls onData with each parsed "data:" payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && line !== "data: [DONE]") onData(JSON.parse(line.slice(6)));
      }
    }
  }
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || state.busy || !state.model) return;
  state.busy = true;
  $("send").disabled = true;
  $("prompt").value = "";
  addMessage("user", text);
  const history = [...state.messages, { role: "user", content: text }];
  const message = addMessage("assistant", "");
  const content = message.querySelector(".content");
  message.dataset.state = "streaming";
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        model: state.model,
        messages: history,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(body?.error?.message || `${response.status} ${response.statusText}`);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        answer += delta;
        content.textContent = answer;
        scrollDown();
      }
      if (chunk.stamen) showRoute(message, chunk.stamen.route);
    });
    state.messages = [...history, { role: "assistant", content: answer }];
    message.dataset.state = "done";
  } catch (error) {
    content.textContent = answer ? `${answer}\n\n[${error.message}]` : error.message;
    message.dataset.state = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
    $("prompt").focus();
    scrollDown();
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
    $("send").disabled = false;
  } catch (error) {
    $("model").textContent = `cannot reach the API: ${error.message}`;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    send();
  }
});
$("new-chat").addEventListener("click", () => {
  if (state.busy) return;
  state.messages = [];
  for (const message of document.querySelectorAll(".message")) message.remove();
  $("prompt").focus();
});
loadModel();
