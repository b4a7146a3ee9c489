// The official x402 TypeScript client (`@x402/fetch` + `@x402/evm` 'exact') buying one job from
// procure's gateway: quote, pay /submit-job, poll /job-status to its end, then replay the same
// payment. Environment: GATEWAY_URL, SECRET (the gateway's bearer), PRIVATE_KEY, KEY (an
// idempotency key), NETWORK, ASSET and MAX_AMOUNT (the client's spend control: the local token is
// none of its default assets). Prints one JSON object on stdout.
import { wrapFetchWithPaymentFromConfig } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm";
import { privateKeyToAccount } from "viem/accounts";

const url = process.env.GATEWAY_URL;
const key = process.env.KEY;
const auth = { authorization: `Bearer ${process.env.SECRET}` };
const account = privateKeyToAccount(process.env.PRIVATE_KEY);

async function call(path, init = {}) {
  const response = await fetch(`${url}${path}`, {
    ...init,
    headers: { "content-type": "application/json", ...auth, ...(init.headers ?? {}) },
  });
  return { status: response.status, headers: response.headers, body: await response.json() };
}

const quote = await call("/quote", {
  method: "POST",
  body: JSON.stringify({ gpuType: "RTX4090", hours: 1 }),
});
if (quote.status !== 200) throw new Error(`quote refused: ${JSON.stringify(quote.body)}`);
const quoteId = quote.body.quoteId;

// Records the payment header the x402 client sends, so that it can be replayed by hand.
let sentPayment = null;
const recording = async (request) => {
  sentPayment ??= request.headers.get("payment-signature") ?? request.headers.get("x-payment");
  return fetch(request);
};
const paying = wrapFetchWithPaymentFromConfig(recording, {
  schemes: [{ network: "eip155:*", client: new ExactEvmScheme(account) }],
  spendControls: {
    allowedAssets: [
      {
        network: process.env.NETWORK,
        asset: process.env.ASSET,
        maxAmountPerPayment: process.env.MAX_AMOUNT,
      },
    ],
  },
});
const submitInit = (idempotencyKey, extra = {}) => ({
  method: "POST",
  headers: {
    "content-type": "application/json",
    ...auth,
    "Idempotency-Key": idempotencyKey,
    "X-Quote-Id": quoteId,
    ...extra,
  },
  body: JSON.stringify({ quoteId, jobParams: { epochs: 2 } }),
});
const paid = await paying(`${url}/submit-job`, submitInit(key));
const paidBody = await paid.json();
const jobId = paidBody.jobId;

let status = null;
const deadline = Date.now() + 45_000;
while (jobId && Date.now() < deadline) {
  status = (await call(`/job-status?jobId=${encodeURIComponent(jobId)}`)).body;
  if (["completed", "failed", "cancelled"].includes(status.status)) break;
  await new Promise((resolve) => setTimeout(resolve, 200));
}

// The same payment header, sent again by hand: under the same key (a retry after a lost answer)
// and under a fresh key (an attempt to buy a second job with one payment).
const replay = async (idempotencyKey) => {
  const response = await fetch(
    `${url}/submit-job`,
    submitInit(idempotencyKey, { "PAYMENT-SIGNATURE": sentPayment }),
  );
  return {
    status: response.status,
    body: await response.text(),
    idempotentReplay: response.headers.get("x-idempotent-replay"),
  };
};
const sameKey = await replay(key);
const otherKey = await replay(`${key}-again`);

console.log(
  JSON.stringify({
    address: account.address,
    quote: quote.body,
    paid: {
      status: paid.status,
      body: paidBody,
      paymentResponse: paid.headers.get("payment-response"),
    },
    sentPayment,
    jobStatus: status,
    replaySameKey: sameKey,
    replayOtherKey: otherKey,
  }),
);
