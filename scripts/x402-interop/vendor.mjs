// A GPU vendor built on faremeter's x402 middleware (a second x402 implementation), speaking
// procure's vendor protocol just enough for procure's agent to buy from it: POST /quote, and
// POST /submit-job behind faremeter's payment gate. Payments are verified and settled by the
// facilitator at FACILITATOR_URL (procure's local one). Configuration from the environment:
// PORT, FACILITATOR_URL, NETWORK, ASSET, ASSET_NAME, ASSET_VERSION, PAY_TO, PRICE (atomic units
// per hour), VENDOR_ID, X402_VERSIONS ("1", "2" or "1,2"; faremeter's default is v1 only).
import http from "node:http";
import { common } from "@faremeter/middleware";

const env = process.env;
const versions = (env.X402_VERSIONS ?? "1").split(",");
const supportedVersions = { x402v1: versions.includes("1"), x402v2: versions.includes("2") };
const accept = {
  scheme: "exact",
  network: env.NETWORK,
  amount: env.PRICE,
  asset: env.ASSET,
  payTo: env.PAY_TO,
  maxTimeoutSeconds: 300,
  extra: { name: env.ASSET_NAME, version: env.ASSET_VERSION },
};
// faremeter's HTTP facilitator handler, with the requirements given here rather than asked of
// a facilitator `/accepts` endpoint (procure's facilitator serves the standard API only).
const remote = common.createRemoteX402Handlers({
  facilitatorURL: env.FACILITATOR_URL,
  accepts: [{ ...accept, maxAmountRequired: env.PRICE }],
  cacheConfig: { disable: true },
})[0];
const handler = { ...remote, getRequirements: async () => [accept] };
const pricing = [
  { amount: env.PRICE, asset: env.ASSET, recipient: env.PAY_TO, network: env.NETWORK },
];
let quotes = 0;
const settled = [];

function send(res, status, body, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(body === undefined ? "" : JSON.stringify(body));
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, `http://${req.headers.host}`);
    const raw = await readBody(req);
    if (req.method === "GET" && url.pathname === "/healthz") return send(res, 200, { ok: true });
    if (req.method === "GET" && url.pathname === "/settled") return send(res, 200, settled);
    if (req.method === "POST" && url.pathname === "/quote") {
      const ask = JSON.parse(raw.toString() || "{}");
      quotes += 1;
      return send(res, 200, {
        quoteId: `fm-q${quotes}`,
        vendorId: env.VENDOR_ID,
        gpuType: ask.gpuType,
        hours: ask.hours,
        pricePerHour: Number(env.PRICE) / 1e6,
        amount: (Number(env.PRICE) * ask.hours) / 1e6,
        currency: "USD",
      });
    }
    if (req.method !== "POST" || url.pathname !== "/submit-job") return send(res, 404, {});
    const headers = {};
    await common.handleMiddlewareRequest({
      x402Handlers: [handler],
      pricing,
      supportedVersions,
      resource: url.toString(),
      getHeader: (key) => req.headers[key.toLowerCase()],
      getBody: async () => raw,
      setResponseHeader: (key, value) => {
        headers[key] = value;
      },
      sendJSONResponse: (status, body, extra) => send(res, status, body, { ...headers, ...extra }),
      body: async ({ capture, protocolVersion }) => {
        const captured = await capture();
        if (!captured.success) return captured.errorResponse;
        settled.push({ version: protocolVersion, transaction: captured.response.transaction });
        send(
          res,
          200,
          {
            jobId: `fm-job-${settled.length}`,
            status: "running",
            progress: 0,
            logs: [`paid over x402 v${protocolVersion}`],
            paidHours: 1,
          },
          headers,
        );
      },
    });
  } catch (err) {
    if (!res.headersSent) send(res, 500, { error: String(err) });
  }
});
server.listen(Number(env.PORT), "127.0.0.1", () => console.log(`listening ${env.PORT}`));
