// The official JavaScript clients (npm `ollama`, `openai`) against one base URL; prints what
// they returned as JSON, so a test can compare the simulator reached directly with the proxy.
// Usage: node clients.mjs BASE_URL ollama|openai|abort
// abort: two streams (ollama-js, openai-node) the client aborts after its third chunk.
import OpenAI from 'openai';
import { Ollama } from 'ollama';

const [base, kind] = process.argv.slice(2);
const model = 'llama3.2:1b';
const messages = [{ role: 'user', content: 'Tell me about audits' }];
const calls = [];

async function collect(stream) {
  const parts = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

const oa = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'sk-node-test', maxRetries: 0 });
if (kind === 'abort') {
  const ol = new Ollama({ host: base });
  const parts = [];
  const stream = await ol.chat({ model, messages, stream: true, options: { num_predict: 200 } });
  try {
    for await (const part of stream) if (parts.push(part) === 3) stream.abort();
  } catch (e) {
    if (e.name !== 'AbortError') throw e;
  }
  calls.push({ api: 'ollama.chat', text: parts.map((p) => p.message.content).join(''), got: parts });
  const controller = new AbortController();
  const chunks = [];
  const chat = await oa.chat.completions.create(
    { model, messages, stream: true, max_tokens: 200 },
    { signal: controller.signal },
  );
  try {
    for await (const chunk of chat) if (chunks.push(chunk) === 3) controller.abort();
  } catch (e) {
    if (e.name !== 'AbortError' && e.constructor.name !== 'APIUserAbortError') throw e;
  }
  calls.push({ api: 'openai.chat', text: chunks.map((c) => c.choices[0]?.delta.content ?? '').join(''), got: chunks });
  process.stdout.write(JSON.stringify(calls));
  process.exit(0);
}
if (kind === 'ollama') {
  const ol = new Ollama({ host: base });
  const gen = await ol.generate({ model, prompt: 'Write a haiku' });
  calls.push({ api: 'ollama.generate', text: gen.response, got: gen });
  const genParts = await collect(await ol.generate({ model, prompt: 'Stream it', stream: true }));
  calls.push({ api: 'ollama.generate', text: genParts.map((p) => p.response).join(''), got: genParts });
  const chat = await ol.chat({ model, messages });
  calls.push({ api: 'ollama.chat', text: chat.message.content, got: chat });
  const chatParts = await collect(await ol.chat({ model, messages, stream: true }));
  calls.push({ api: 'ollama.chat', text: chatParts.map((p) => p.message.content).join(''), got: chatParts });
}
const chat = await oa.chat.completions.create({ model, messages });
calls.push({ api: 'openai.chat', text: chat.choices[0].message.content, got: chat });
const chunks = await collect(
  await oa.chat.completions.create({ model, messages, stream: true, stream_options: { include_usage: true } }),
);
calls.push({
  api: 'openai.chat',
  text: chunks.map((c) => (c.choices.length ? c.choices[0].delta.content ?? '' : '')).join(''),
  got: chunks,
});
if (kind === 'openai') {
  const comp = await oa.completions.create({ model, prompt: 'Once' });
  calls.push({ api: 'openai.completions', text: comp.choices[0].text, got: comp });
  const compChunks = await collect(await oa.completions.create({ model, prompt: 'Once', stream: true }));
  calls.push({
    api: 'openai.completions',
    text: compChunks.map((c) => (c.choices.length ? c.choices[0].text : '')).join(''),
    got: compChunks,
  });
}
process.stdout.write(JSON.stringify(calls));
