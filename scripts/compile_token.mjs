// Compile contracts/ProcureUSD.sol with solc-js and write the ABI + creation bytecode to
// src/procure/payments/contracts/ProcureUSD.json (loaded by procure.payments.chain).
//
//   cd scripts && npm install --no-package-lock && node compile_token.mjs
//
// The EVM version is pinned to "paris" (no PUSH0), which every py-evm fork used by
// eth-tester executes; the metadata hash is omitted so comment-only edits keep the bytecode.
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..");
const sourcePath = join(root, "contracts", "ProcureUSD.sol");
const outPath = join(root, "src", "procure", "payments", "contracts", "ProcureUSD.json");
const EVM_VERSION = "paris";

const input = {
  language: "Solidity",
  sources: { "ProcureUSD.sol": { content: readFileSync(sourcePath, "utf8") } },
  settings: {
    evmVersion: EVM_VERSION,
    optimizer: { enabled: true, runs: 200 },
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors ?? []).filter((e) => e.severity === "error");
for (const e of output.errors ?? []) {
  console.error(e.formattedMessage);
}
if (errors.length > 0) {
  process.exit(1);
}

const contract = output.contracts["ProcureUSD.sol"].ProcureUSD;
const artifact = {
  contractName: "ProcureUSD",
  compiler: `solc-js ${solc.version()}`,
  evmVersion: EVM_VERSION,
  abi: contract.abi,
  bytecode: `0x${contract.evm.bytecode.object}`,
};
mkdirSync(dirname(outPath), { recursive: true });
writeFileSync(outPath, `${JSON.stringify(artifact, null, 2)}\n`);
console.log(`wrote ${outPath} (${contract.evm.bytecode.object.length / 2} bytes of bytecode)`);
