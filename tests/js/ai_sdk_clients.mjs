// The AI SDK against a qwen-ref server: Cloudflare's workers-ai-provider and @ai-sdk/openai-compatible, each
// through a plain answer, a stream, and a tool loop (the call, the tool's result sent back, the answer).
// Usage: node ai_sdk_clients.mjs BASE_URL TOKEN MODEL; prints one JSON line per check, exits non-zero on failure.
import { generateText, streamText, tool, stepCountIs } from "ai";
import { createWorkersAI } from "workers-ai-provider";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { z } from "zod";

const [base, token, model] = process.argv.slice(2);
const account = "acct";

// workers-ai-provider calls api.cloudflare.com; its `fetch` option sends those requests to the server instead
const toServer = (input, init) => fetch(String(input).replace("https://api.cloudflare.com", base), init);
const providers = {
  "workers-ai-provider": createWorkersAI({ accountId: account, apiKey: token, fetch: toServer })(model),
  "openai-compatible": createOpenAICompatible({ name: "qwen-ref", apiKey: token,
    baseURL: `${base}/client/v4/accounts/${account}/ai/v1` })(model),
};

const weather = tool({
  description: "The weather now in a city",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => `sunny, 24C in ${city}`,
});

let failed = false;
function check(provider, name, ok, detail) {
  console.log(JSON.stringify({ provider, check: name, ok, detail }));
  if (!ok) failed = true;
}

for (const [provider, m] of Object.entries(providers)) {
  try {
    const plain = await generateText({ model: m, prompt: "Say hello", maxOutputTokens: 30 });
    check(provider, "generateText", plain.text === "Hello! How can I help you today?", plain.text);

    const stream = streamText({ model: m, prompt: "Say hello", maxOutputTokens: 30 });
    let text = "";
    for await (const part of stream.textStream) text += part;
    check(provider, "streamText", text === "Hello! How can I help you today?", text);

    const loop = await generateText({ model: m, prompt: "What is the weather in Paris?", tools: { get_weather: weather },
      stopWhen: stepCountIs(3), maxOutputTokens: 64 });
    const calls = loop.steps.flatMap((s) => s.toolCalls.map((c) => ({ name: c.toolName, input: c.input })));
    check(provider, "tool loop", JSON.stringify(calls) === JSON.stringify([{ name: "get_weather", input: { city: "Paris" } }])
      && loop.text === "It is sunny in Paris.", { calls, text: loop.text, steps: loop.steps.length });
  } catch (e) {
    check(provider, "no exception", false, String(e && e.stack || e));
  }
}
process.exit(failed ? 1 : 0);
