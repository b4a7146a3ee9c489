"""Real x402 settlement on a local, in-process EVM chain.

`LocalChain` runs an eth-tester (py-evm) chain inside the process, deploys the ProcureUSD
token (an EIP-3009 ERC-20, see ``contracts/ProcureUSD.sol``) from a key derived from a fixed
seed, and makes the chain durable across restarts with an append-only JSONL journal:

* The journal's first line records the genesis timestamp. Every later line is one mined
  transaction sent by the chain's own key (a mint, or a facilitator ``transferWithAuthorization``),
  stored as the exact signed raw transaction plus a readable form (function, arguments,
  block timestamp, tx hash, status).
* A line is appended (and fsynced) only after the transaction was mined, and *inside* the
  chain lock, before anything can observe the new state: the tx hash is returned, and balances
  or logs can be read, only once the line is durable. If the journal write fails, the chain
  is rolled back to its pre-transaction snapshot and the error propagates, so memory and
  journal never disagree. A crash before the fsync loses a transaction nobody saw (no hash was
  returned, no settle succeeded); the payer's authorization simply stays unused.
* On construction the journal is replayed onto a fresh chain: same genesis timestamp, the
  deploy at genesis+1, then each raw transaction re-sent with its recorded block timestamp.
  Signed transactions are deterministic, so balances, used EIP-3009 nonces, Transfer logs and
  tx hashes all come back identical; a divergence raises `JournalReplayError`. A torn last
  line (crash mid-write) is dropped and truncated away.

Every transaction is mined at once in its own block, stamped with the wall clock. Blocks
mined within the same second share its timestamp (py-evm's "strictly later than the parent"
header rule is relaxed to "not earlier", see `_SameSecondPragueVM`), so a burst of
settlements leaves block time with the wall clock, as on a real chain where one block holds
many transactions, instead of running it one second ahead per transaction: an EIP-3009
authorization with a short ``validBefore`` (a small PROCURE_PAYMENT_WINDOW_S) would otherwise
expire on chain before it settles. Block timestamps never go backwards.

The journal's file format lives in `chain_journal`; `ChainFacilitatorSigner` and
`make_facilitator` (the x402 SDK's facilitator over a `LocalChain`) in `chain_facilitator`, both
re-exported here. All chain access goes through one re-entrant lock, so an HTTP facilitator may
call from many threads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from eth.abc import BlockHeaderAPI
from eth.vm.forks.prague import PragueVM
from eth_account import Account
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.backends.pyevm.main import get_default_account_state
from eth_utils import keccak, to_canonical_address, to_checksum_address
from hexbytes import HexBytes
from web3 import EthereumTesterProvider, Web3
from x402.mechanisms.evm.constants import TX_STATUS_SUCCESS

from procure.payments.chain_facilitator import (
    ChainFacilitatorSigner,
    make_facilitator,
    make_facilitator_sync,
)
from procure.payments.chain_journal import (
    JOURNAL_VERSION,
    JournalError,
    JournalReplayError,
    append_journal,
    jsonable,
    read_journal,
    to_hex,
)

__all__ = [
    "CHAIN_KEY_SEED",
    "ChainFacilitatorSigner",
    "JournalError",
    "JournalReplayError",
    "LocalChain",
    "make_facilitator",
    "make_facilitator_sync",
]

#: Seed of the chain's single key: it deploys the token, is the only minter, and submits the
#: facilitator's settlement transactions. Fixed, so addresses survive restarts.
CHAIN_KEY_SEED = b"procure.payments.chain/local-deployer/v1"

_DEPLOY_GAS = 3_000_000
_TX_GAS = 500_000
# Fixed EIP-1559 fees keep signed transactions (and so tx hashes) deterministic. The base fee
# starts at 1 gwei and only falls on this nearly empty chain, so these always suffice.
_MAX_FEE_PER_GAS = 5_000_000_000
_MAX_PRIORITY_FEE_PER_GAS = 1_000_000_000
# The genesis block starts a little in the past: the deploy is stamped genesis + 1 (replay
# needs a fixed stamp for it), and that must not be ahead of the wall clock.
_GENESIS_LAG_SECONDS = 10

_AUTHORIZATION_USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)")
_TRANSFER_TOPIC = keccak(text="Transfer(address,address,uint256)")
_ZERO_TOPIC = b"\x00" * 32


class _SameSecondPragueVM(PragueVM):
    """eth-tester's default VM (Prague), except that a block may share its parent's timestamp.

    py-evm requires each block to be strictly later than its parent; with one block per
    transaction that pushes block time one second ahead per transaction in a burst. Equal
    timestamps are what a real chain shows for transactions of one block, and nothing in
    this chain (fees, forks, the EIP-3009 token) depends on them differing.
    """

    @classmethod
    def validate_header(cls, header: BlockHeaderAPI, parent_header: BlockHeaderAPI) -> None:
        if parent_header is not None and header.timestamp == parent_header.timestamp:
            # Every other rule still applies: check them against a parent one second older.
            parent_header = parent_header.copy(timestamp=parent_header.timestamp - 1)
        super().validate_header(header, parent_header)


def _load_token_artifact() -> dict[str, Any]:
    """Load the compiled ProcureUSD ABI and creation bytecode shipped with the package."""
    text = (
        resources.files("procure.payments")
        .joinpath("contracts", "ProcureUSD.json")
        .read_text(encoding="utf-8")
    )
    artifact: dict[str, Any] = json.loads(text)
    return artifact


class LocalChain:
    """An in-process EVM chain with the ProcureUSD token, durable through a JSONL journal.

    Args:
        journal_path: Where to keep the journal. ``None`` keeps the chain purely in memory.
            An existing journal is replayed on construction.
    """

    def __init__(self, journal_path: Path | None = None) -> None:
        self._lock = threading.RLock()
        self._journal_path = Path(journal_path) if journal_path is not None else None
        self._account = Account.from_key(keccak(CHAIN_KEY_SEED))
        self._artifact = _load_token_artifact()
        self.token_abi: list[dict[str, Any]] = self._artifact["abi"]
        # (authorizer, nonce) -> tx hash of every used EIP-3009 authorisation, kept as blocks
        # are mined: a log scan per lookup grows with the chain (seconds at a few hundred).
        self._used_nonces: dict[tuple[str, str], str] = {}
        self._nonce_transfers: dict[tuple[str, str], tuple[str, int]] = {}  # -> (to, value)
        self._minted: dict[str, int] = {}  # address (lower case) -> all ever minted to it

        entries = read_journal(self._journal_path)
        genesis_entry = entries[0] if entries and entries[0].get("op") == "genesis" else None
        if entries and genesis_entry is None:
            raise JournalError(f"{self._journal_path}: first line is not a genesis record")
        genesis_ts = (
            int(genesis_entry["timestamp"])
            if genesis_entry is not None
            else int(time.time()) - _GENESIS_LAG_SECONDS
        )

        self._backend = PyEVMBackend(
            genesis_parameters=PyEVMBackend.generate_genesis_params(
                overrides={"timestamp": genesis_ts}
            ),
            vm_configuration=((0, _SameSecondPragueVM),),
            genesis_state={
                # eth-tester's default sender (key 0x..01) must afford gas for plain eth_calls.
                to_canonical_address(Account.from_key(b"\x00" * 31 + b"\x01").address): (
                    get_default_account_state()
                ),
                to_canonical_address(self._account.address): get_default_account_state(),
            },
        )
        self._tester = EthereumTester(backend=self._backend)
        self._w3 = Web3(EthereumTesterProvider(self._tester))
        self.chain_id: int = int(self._w3.eth.chain_id)
        self.network: str = f"eip155:{self.chain_id}"

        self.token_address: str = self._deploy_token(genesis_ts + 1)
        self._token = self._w3.eth.contract(address=self.token_address, abi=self.token_abi)
        self.token_name: str = self._token.functions.name().call(self._call_opts())
        self.token_version: str = self._token.functions.version().call(self._call_opts())
        self.token_decimals: int = self._token.functions.decimals().call(self._call_opts())

        if genesis_entry is None:
            if self._journal_path is not None:
                append_journal(
                    self._journal_path,
                    {
                        "v": JOURNAL_VERSION,
                        "op": "genesis",
                        "timestamp": genesis_ts,
                        "chain_id": self.chain_id,
                        "key_address": self._account.address,
                        "token": self.token_address,
                    },
                )
        else:
            if genesis_entry.get("token") != self.token_address:
                raise JournalReplayError(
                    f"journal token {genesis_entry.get('token')} != deployed {self.token_address}"
                )
            self._replay(entries[1:])

    # ------------------------------------------------------------------ properties

    @property
    def facilitator_address(self) -> str:
        """Address that submits settlement transactions (also the deployer and minter)."""
        return self._account.address

    @property
    def deployer_address(self) -> str:
        """Address that deployed the token; the only one allowed to mint."""
        return self._account.address

    @property
    def journal_path(self) -> Path | None:
        """The journal file, or ``None`` for an in-memory chain."""
        return self._journal_path

    def payment_extra(self) -> dict[str, str]:
        """The EIP-712 domain fields a 402's ``requirements.extra`` must carry for this token."""
        return {"name": self.token_name, "version": self.token_version}

    # ------------------------------------------------------------------ token views

    def balance_of(self, address: str) -> int:
        """Token balance of ``address`` in atomic units (6 decimals)."""
        return int(self._read(self._token.functions.balanceOf(to_checksum_address(address))))

    def native_balance(self, address: str) -> int:
        """Native (gas) balance of ``address`` in wei."""
        with self._lock:
            return int(self._w3.eth.get_balance(to_checksum_address(address)))

    def authorization_state(self, authorizer: str, nonce_hex: str) -> bool:
        """Whether the EIP-3009 ``nonce_hex`` of ``authorizer`` has been used."""
        nonce = HexBytes(nonce_hex)
        if len(nonce) != 32:
            raise ValueError(f"EIP-3009 nonce must be 32 bytes, got {len(nonce)}")
        fn = self._token.functions.authorizationState(to_checksum_address(authorizer), nonce)
        return bool(self._read(fn))

    def transfers(self, from_block: int = 0) -> list[dict[str, Any]]:
        """All token Transfer events in chain order (mints have ``from`` = zero address),
        from block ``from_block`` on."""
        with self._lock:
            logs = self._token.events.Transfer().get_logs(from_block=from_block, to_block="latest")
        return [
            {
                "from": log["args"]["from"],
                "to": log["args"]["to"],
                "value": int(log["args"]["value"]),
                "tx_hash": to_hex(log["transactionHash"]),
                "block_number": int(log["blockNumber"]),
                "log_index": int(log["logIndex"]),
            }
            for log in logs
        ]

    def used_authorizations(
        self, authorizer: str | None = None, from_block: int = 0
    ) -> list[dict[str, Any]]:
        """Every EIP-3009 authorisation used (of ``authorizer``, from block ``from_block`` on),
        in chain order: authorizer, nonce, tx hash, block number."""
        filters = {"authorizer": to_checksum_address(authorizer)} if authorizer else None
        with self._lock:
            logs = self._token.events.AuthorizationUsed().get_logs(
                from_block=from_block, to_block="latest", argument_filters=filters
            )
        return [
            {
                "authorizer": log["args"]["authorizer"],
                "nonce": to_hex(log["args"]["nonce"]),
                "tx_hash": to_hex(log["transactionHash"]),
                "block_number": int(log["blockNumber"]),
            }
            for log in logs
        ]

    def transaction_for_nonce(self, authorizer: str, nonce_hex: str) -> str | None:
        """The hash of the transaction that used ``authorizer``'s EIP-3009 ``nonce_hex``."""
        with self._lock:
            return self._used_nonces.get((authorizer.lower(), to_hex(HexBytes(nonce_hex))))

    def settlement_for_nonce(self, authorizer: str, nonce_hex: str) -> dict[str, Any] | None:
        """What ``authorizer``'s EIP-3009 ``nonce_hex`` paid: tx hash, payee and amount."""
        key = (authorizer.lower(), to_hex(HexBytes(nonce_hex)))
        with self._lock:
            tx = self._used_nonces.get(key)
            if tx is None:
                return None
            to, value = self._nonce_transfers.get(key, (None, None))
        return {"transaction": tx, "to": to, "amount": value}

    def minted_to(self, address: str) -> int:
        """All the tokens ever minted to ``address`` (atomic units), e.g. by the faucet."""
        with self._lock:
            return self._minted.get(address.lower(), 0)

    def _index_receipt(self, tx_hash: str, receipt: Any) -> None:
        """Remember the authorisations a mined transaction used (see `transaction_for_nonce`)
        and what it minted (see `minted_to`)."""
        used: list[tuple[str, str]] = []
        transfers: list[tuple[str, str, int]] = []
        for log in receipt.get("logs") or []:
            topics = [bytes(t) for t in log["topics"]]
            if to_checksum_address(log["address"]) != self.token_address or len(topics) != 3:
                continue
            if topics[0] == _AUTHORIZATION_USED_TOPIC:
                used.append(("0x" + topics[1][-20:].hex(), to_hex(topics[2])))
            elif topics[0] == _TRANSFER_TOPIC:
                source, to = "0x" + topics[1][-20:].hex(), "0x" + topics[2][-20:].hex()
                value = int.from_bytes(bytes(log["data"]))
                transfers.append((source, to, value))
                if topics[1] == _ZERO_TOPIC:
                    self._minted[to] = self._minted.get(to, 0) + value
        for authorizer, nonce in used:
            self._used_nonces[(authorizer, nonce)] = tx_hash
            paid = next(((to, v) for src, to, v in transfers if src == authorizer), None)
            if paid is not None:
                self._nonce_transfers[(authorizer, nonce)] = (to_checksum_address(paid[0]), paid[1])

    # ------------------------------------------------------------------ state changes

    def mint(self, address: str, amount: int) -> str:
        """Mint ``amount`` atomic units to ``address``; returns the tx hash (journaled)."""
        if amount < 0:
            raise ValueError("amount must be non-negative")
        to = to_checksum_address(address)
        data = HexBytes(self._token.encode_abi("mint", [to, int(amount)]))
        return self.transact(
            self.token_address,
            bytes(data),
            function="mint",
            args={"to": to, "value": int(amount)},
        )

    def transact(
        self,
        to: str,
        data: bytes,
        *,
        function: str = "",
        args: Any = None,
    ) -> str:
        """Send a journaled transaction from the chain's key and return its hash.

        The call is first simulated on the pending block; a revert raises
        ``eth_tester.exceptions.TransactionFailed`` ("execution reverted: <reason>") and
        nothing is sent or journaled. ``function``/``args`` are recorded for audits only.
        """
        target = to_checksum_address(to)
        with self._lock:
            self._refresh_pending_timestamp()
            self._eth_call(target, data, pending=True)
            raw, nonce = self._sign(target, data, gas=_TX_GAS)
            snapshot = self._tester.take_snapshot()
            try:
                tx_hash = to_hex(self._w3.eth.send_raw_transaction(raw))
                receipt = self._w3.eth.get_transaction_receipt(tx_hash)
                block = self._w3.eth.get_block(receipt["blockNumber"])
                append_journal(
                    self._journal_path,
                    {
                        "v": JOURNAL_VERSION,
                        "op": "tx",
                        "timestamp": int(block["timestamp"]),
                        "nonce": nonce,
                        "to": target,
                        "function": function,
                        "args": jsonable(args),
                        "tx_hash": tx_hash,
                        "status": int(receipt["status"]),
                        "raw_tx": to_hex(raw),
                    },
                )
            except BaseException:
                # Not journaled means it never happened: undo it before anyone can see it.
                self._tester.revert_to_snapshot(snapshot)
                raise
            self._index_receipt(tx_hash, receipt)
            return tx_hash

    # ------------------------------------------------------------------ raw access

    def call(self, to: str, data: bytes) -> bytes:
        """Read-only ``eth_call`` from the chain's key against the pending block (now)."""
        with self._lock:
            self._refresh_pending_timestamp()
            return self._eth_call(to_checksum_address(to), data, pending=True)

    def read(self, fn: Any) -> Any:
        """Call a bound web3 contract function (``contract.functions.x(...)``) on the chain."""
        return self._read(fn)

    def contract(self, address: str, abi: list[dict[str, Any]]) -> Any:
        """A web3 contract object for building calldata; run calls through `read`/`transact`."""
        return self._w3.eth.contract(address=to_checksum_address(address), abi=abi)

    def code_at(self, address: str) -> bytes:
        """Deployed bytecode at ``address`` (empty for an EOA)."""
        with self._lock:
            return bytes(self._w3.eth.get_code(to_checksum_address(address)))

    def receipt(self, tx_hash: str) -> dict[str, Any]:
        """The mined receipt of ``tx_hash`` (every sent transaction is mined at once)."""
        with self._lock:
            return dict(self._w3.eth.get_transaction_receipt(to_hex(tx_hash)))

    def block_timestamp(self) -> int:
        """Timestamp of the latest mined block."""
        with self._lock:
            return int(self._w3.eth.get_block("latest")["timestamp"])

    # ------------------------------------------------------------------ internals

    def _call_opts(self) -> dict[str, Any]:
        return {"from": self._account.address}

    def _read(self, fn: Any) -> Any:
        with self._lock:
            self._refresh_pending_timestamp()
            return fn.call(self._call_opts(), block_identifier="pending")

    def _eth_call(self, to: str, data: bytes, *, pending: bool) -> bytes:
        tx = {"from": self._account.address, "to": to, "data": to_hex(data)}
        block = "pending" if pending else "latest"
        return bytes(self._w3.eth.call(tx, block_identifier=block))  # type: ignore[arg-type]

    def _refresh_pending_timestamp(self, timestamp: int | None = None) -> None:
        """Give the (always empty) pending block a timestamp: ``timestamp``, else ~now.

        eth-tester stamps the pending block when the previous block is mined, so an idle
        chain would otherwise execute the next transaction with a stale ``block.timestamp``.
        """
        latest = int(self._w3.eth.get_block("latest")["timestamp"])
        if timestamp is None:
            # Same second as the latest block is fine (see `_SameSecondPragueVM`); earlier is not.
            timestamp = max(int(time.time()), latest)
        elif timestamp < latest:
            raise JournalReplayError(
                f"journal timestamp {timestamp} is before the latest block ({latest})"
            )
        self._backend.chain.set_header_timestamp(timestamp)

    def _sign(self, to: str | None, data: bytes, *, gas: int) -> tuple[bytes, int]:
        """Sign a deterministic EIP-1559 transaction; returns (raw transaction, nonce)."""
        nonce = int(self._w3.eth.get_transaction_count(self._account.address))
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self.chain_id,
            "nonce": nonce,
            "gas": gas,
            "maxFeePerGas": _MAX_FEE_PER_GAS,
            "maxPriorityFeePerGas": _MAX_PRIORITY_FEE_PER_GAS,
            "value": 0,
            "data": to_hex(data),
        }
        if to is not None:
            tx["to"] = to
        return bytes(self._account.sign_transaction(tx).raw_transaction), nonce

    def _deploy_token(self, timestamp: int) -> str:
        with self._lock:
            self._refresh_pending_timestamp(timestamp)
            raw, _ = self._sign(None, HexBytes(self._artifact["bytecode"]), gas=_DEPLOY_GAS)
            tx_hash = self._w3.eth.send_raw_transaction(raw)
            receipt = self._w3.eth.get_transaction_receipt(tx_hash)
            if receipt["status"] != TX_STATUS_SUCCESS or not receipt["contractAddress"]:
                raise RuntimeError("ProcureUSD deployment failed")
            return to_checksum_address(receipt["contractAddress"])

    def _replay(self, entries: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            for index, entry in enumerate(entries, start=2):
                if entry.get("op") != "tx":
                    raise JournalReplayError(f"journal line {index}: unknown op {entry.get('op')}")
                self._refresh_pending_timestamp(int(entry["timestamp"]))
                try:
                    tx_hash = to_hex(self._w3.eth.send_raw_transaction(HexBytes(entry["raw_tx"])))
                except Exception as exc:
                    raise JournalReplayError(f"journal line {index}: rejected: {exc}") from exc
                receipt = self._w3.eth.get_transaction_receipt(tx_hash)
                status = int(receipt["status"])
                self._index_receipt(tx_hash, receipt)
                if tx_hash != entry["tx_hash"] or status != int(entry["status"]):
                    raise JournalReplayError(
                        f"journal line {index}: replay gave {tx_hash} status {status}, "
                        f"journal has {entry['tx_hash']} status {entry['status']}"
                    )
