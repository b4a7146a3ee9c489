"""The x402 SDK's facilitator signer over the local chain: `ChainFacilitatorSigner` and
`make_facilitator`, which settle 'exact' EVM payments on a `LocalChain`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from eth_abi import encode as abi_encode
from eth_tester.exceptions import TransactionFailed
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from x402 import x402Facilitator, x402FacilitatorSync
from x402.mechanisms.evm.constants import MULTICALL3_ADDRESS
from x402.mechanisms.evm.data_suffix import append_data_suffix
from x402.mechanisms.evm.exact import ExactEvmFacilitatorScheme, ExactEvmSchemeConfig
from x402.mechanisms.evm.types import TransactionReceipt, TypedDataDomain, TypedDataField
from x402.mechanisms.evm.verify import verify_typed_data_strict

from procure.payments.chain_journal import to_hex

if TYPE_CHECKING:
    from procure.payments.chain import LocalChain

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")
_REVERT_PREFIX = "execution reverted: "

_HEX_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def checksum_args(args: Sequence[Any]) -> list[Any]:
    """Contract call arguments with every hex address in EIP-55 form: web3 refuses lowercase
    ones, and a vendor's requirements (so the authorisation's `to`) may carry them."""
    return [
        to_checksum_address(a) if isinstance(a, str) and _HEX_ADDRESS.match(a) else a for a in args
    ]


def revert_payload(exc: TransactionFailed) -> bytes:
    """Re-encode an eth-tester revert as ``Error(string)`` return data."""
    message = str(exc.args[0]) if exc.args else str(exc)
    reason = message.removeprefix(_REVERT_PREFIX)
    return _ERROR_STRING_SELECTOR + abi_encode(["string"], [reason])


class ChainFacilitatorSigner:
    """The x402 SDK's ``FacilitatorEvmSigner`` protocol, backed by a `LocalChain`.

    Reads run against the pending block at the current time; ``write_contract`` and
    ``send_transaction`` are simulated first (a revert raises with the contract's reason,
    which the SDK maps to its error codes) and then mined and journaled by the chain.
    Multicall3 does not exist on the local chain, so ``tryAggregate`` calls to its canonical
    address are answered by running each sub-call in turn.
    """

    def __init__(self, chain: LocalChain) -> None:
        self._chain = chain

    @property
    def address(self) -> str:
        """The facilitator's settlement address."""
        return self._chain.facilitator_address

    def get_addresses(self) -> list[str]:
        """Addresses this facilitator settles from (one)."""
        return [self._chain.facilitator_address]

    def read_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
    ) -> Any:
        """Call a view (or simulate a write) and return the decoded result."""
        if (
            function_name == "tryAggregate"
            and to_checksum_address(address) == to_checksum_address(MULTICALL3_ADDRESS)
            and not self._chain.code_at(address)
        ):
            return self._try_aggregate(bool(args[0]), args[1])
        contract = self._chain.contract(address, abi)
        return self._chain.read(contract.functions[function_name](*checksum_args(args)))

    def verify_typed_data(
        self,
        address: str,
        domain: TypedDataDomain,
        types: dict[str, list[TypedDataField]],
        primary_type: str,
        message: dict[str, Any],
        signature: bytes,
    ) -> bool:
        """Verify an EIP-712 signature as the chain would (ecrecover, or EIP-1271 for code)."""
        return verify_typed_data_strict(
            self,
            address,
            domain,
            types,  # type: ignore[arg-type]
            primary_type,
            message,
            signature,
        )

    def write_contract(
        self,
        address: str,
        abi: list[dict[str, Any]],
        function_name: str,
        *args: Any,
        data_suffix: str | None = None,
    ) -> str:
        """Encode, simulate, send and journal a contract call; return the tx hash."""
        contract = self._chain.contract(address, abi)
        args = tuple(checksum_args(args))
        encoded = to_hex(contract.encode_abi(function_name, list(args)))
        calldata = append_data_suffix(encoded, data_suffix)
        names = next(
            (
                [item.get("name") or f"arg{i}" for i, item in enumerate(entry.get("inputs", []))]
                for entry in abi
                if entry.get("type") == "function" and entry.get("name") == function_name
            ),
            [f"arg{i}" for i in range(len(args))],
        )
        return self._chain.transact(
            address,
            bytes(HexBytes(calldata)),
            function=function_name,
            args=dict(zip(names, args, strict=False)),
        )

    def send_transaction(self, to: str, data: bytes) -> str:
        """Simulate, send and journal a raw call; return the tx hash."""
        return self._chain.transact(to, bytes(data), function="", args=None)

    def wait_for_transaction_receipt(self, tx_hash: str) -> TransactionReceipt:
        """Receipt of a (already mined) transaction, logs as plain hex dicts."""
        receipt = self._chain.receipt(tx_hash)
        logs = [
            {
                "address": to_checksum_address(log["address"]),
                "topics": [to_hex(topic) for topic in log["topics"]],
                "data": to_hex(log["data"]),
            }
            for log in receipt.get("logs") or []
        ]
        return TransactionReceipt(
            status=int(receipt["status"]),
            block_number=int(receipt["blockNumber"]),
            tx_hash=to_hex(tx_hash),
            logs=logs,
        )

    def get_balance(self, address: str, token_address: str) -> int:
        """Token balance, or the native balance for the zero/empty token address."""
        if not token_address or int(token_address, 16) == 0:
            return self._chain.native_balance(address)
        if to_checksum_address(token_address) == self._chain.token_address:
            return self._chain.balance_of(address)
        contract = self._chain.contract(token_address, self._chain.token_abi)
        return int(self._chain.read(contract.functions.balanceOf(to_checksum_address(address))))

    def get_chain_id(self) -> int:
        """The local chain's id (eth-tester: 131277322940537)."""
        return self._chain.chain_id

    def get_code(self, address: str) -> bytes:
        """Bytecode at ``address`` (empty for an EOA)."""
        return self._chain.code_at(address)

    def _try_aggregate(
        self, require_success: bool, calls: Sequence[Sequence[Any]]
    ) -> list[tuple[bool, bytes]]:
        results: list[tuple[bool, bytes]] = []
        for target, call_data in calls:
            try:
                results.append((True, self._chain.call(str(target), bytes(HexBytes(call_data)))))
            except TransactionFailed as exc:
                if require_success:
                    raise
                results.append((False, revert_payload(exc)))
        return results


_F = TypeVar("_F", x402Facilitator, x402FacilitatorSync)


def _register(facilitator: _F, chain: LocalChain, config: ExactEvmSchemeConfig | None) -> _F:
    scheme = ExactEvmFacilitatorScheme(
        ChainFacilitatorSigner(chain),
        config or ExactEvmSchemeConfig(eip6492_allowed_factories=[], simulate_in_settle=False),
    )
    facilitator.register([chain.network], scheme)
    return facilitator


def make_facilitator(
    chain: LocalChain, config: ExactEvmSchemeConfig | None = None
) -> x402Facilitator:
    """An async ``x402Facilitator`` settling 'exact' EVM payments on ``chain.network``.

    ERC-6492 smart-wallet deployment stays disabled (no factory is allow-listed).
    """
    return _register(x402Facilitator(), chain, config)


def make_facilitator_sync(
    chain: LocalChain, config: ExactEvmSchemeConfig | None = None
) -> x402FacilitatorSync:
    """Like `make_facilitator`, but the synchronous ``x402FacilitatorSync``."""
    return _register(x402FacilitatorSync(), chain, config)
