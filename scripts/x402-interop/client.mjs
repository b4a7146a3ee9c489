// faremeter's x402 client (`@faremeter/fetch` with its EVM 'exact' payment handler) making one
// paid request. Argument: a JSON object {url, privateKey, chainId, asset, assetName, headers,
// body}. Prints {status, body, paymentResponse} as JSON on stdout.
import { wrap } from "@faremeter/fetch";
import { createPaymentHandler } from "@faremeter/payment-evm/exact";
import { createLocalWallet } from "@faremeter/wallet-evm";

const args = JSON.parse(process.argv[2]);
const wallet = await createLocalWallet(
  { id: args.chainId, name: "procure-local" },
  args.privateKey,
);
const handler = createPaymentHandler(wallet, {
  asset: { address: args.asset, contractName: args.assetName },
});
const paying = wrap(fetch, { handlers: [handler], retryCount: 0, returnPaymentFailure: true });
const response = await paying(args.url, {
  method: "POST",
  headers: { "content-type": "application/json", ...args.headers },
  body: JSON.stringify(args.body),
});
const text = await response.text();
console.log(
  JSON.stringify({
    status: response.status,
    body: text,
    paymentResponse:
      response.headers.get("payment-response") ?? response.headers.get("x-payment-response"),
  }),
);
