"""SwarmClient: the client's handle on a swarm (DHT, libp2p, routes) and stateless forward passes."""

from __future__ import annotations

import asyncio
import logging

import torch

from client.config import ClientConfig
from client.loop import LoopThread
from client.points import ReceiptBook, VoucherSource
from client.sequence import RouteManager
from client.session import InferenceSession
from proto import pb
from swarm import tensors
from swarm.dht import DHTConfig, SwarmDHT
from swarm.errors import StamenError
from swarm.membership import Membership, load_key
from swarm.rpc import ServerFailure, call_forward, ping
from swarm.spans import BlockRange

logger = logging.getLogger(__name__)

RECEIPT_FLUSH_SECONDS = 3.0  # at shutdown: how long to spend handing out the last receipts


class SwarmClient:
    def __init__(self, config: ClientConfig, prefix: str, num_blocks: int):
        self.config, self.prefix, self.num_blocks = config, prefix, num_blocks
        if config.compression not in tensors.COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(tensors.COMPRESSIONS)}, got {config.compression!r}"
            )
        key = load_key(config.swarm_key) if config.swarm_key else None
        dht_config = DHTConfig(
            initial_peers=list(config.initial_peers),
            client_mode=True,
            swarm_key=key,
            nat_traversal=config.nat_traversal,
        )
        self.dht = SwarmDHT(dht_config)
        self.membership = Membership(key, self.dht.peer_id)
        self.loop = LoopThread()
        self.p2p = self.loop.run(self.dht.replicate_p2p())
        self.routes = RouteManager(self.dht, prefix, num_blocks, config)
        self.receipts = ReceiptBook(self.dht.identity)  # points: the work servers did for us, acknowledged
        self.vouchers = VoucherSource(config.points_key, self.dht.peer_id)
        self._receipting = self.loop.run(self._start_receipting())

    async def _start_receipting(self) -> asyncio.Task:
        return asyncio.ensure_future(self._receipt_forever())

    async def _receipt_forever(self) -> None:
        """Hand the servers signed receipts for their work every ``receipt_period`` seconds."""
        while True:
            await asyncio.sleep(self.config.receipt_period)
            try:
                await self.receipts.send_due(self.p2p, self.membership)
            except Exception:
                logger.debug("Handing out receipts failed", exc_info=True)

    async def measure_pings(self, limit: int = 32) -> None:
        """Round trips to candidate servers whose ping is unknown or stale (concurrently, bounded)."""
        loop = asyncio.get_running_loop()
        servers = await loop.run_in_executor(None, self.routes.candidates)
        stale = self.routes.stale_pings([s.peer_id for s in servers])[:limit]
        results = await asyncio.gather(
            *(ping(self.p2p, peer, 1, 1.0, self.membership.proof_for(peer)) for peer in stale)
        )
        for peer, rtt in zip(stale, results, strict=True):
            if rtt is not None:
                self.routes.record_ping(peer, rtt)

    def server_dtype(self, peer_id: str) -> torch.dtype:
        info = self.routes.server(peer_id)
        return tensors.DTYPES.get(info.dtype, torch.float32) if info else torch.float32

    def compression_for(self, peer_id: str) -> int:
        """The activation compression to use with a server: the configured one if the server supports it."""
        wanted = tensors.COMPRESSIONS[self.config.compression]
        info = self.routes.server(peer_id)
        return wanted if info is not None and wanted in info.compressions else pb.COMPRESSION_NONE

    def inference_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(self, max_length)

    def forward(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Stateless pass of a batch through all blocks (split by rows to fit the message size)."""
        batch, tokens, hidden_size = hidden.shape
        rows = max(1, self.config.max_message_bytes // (tokens * hidden_size * 4))
        outputs = []
        for start in range(0, batch, rows):
            part = slice(start, start + rows)
            mask = attention_mask[part] if attention_mask is not None else None
            outputs.append(self.loop.run(self._forward(hidden[part], position_ids[part], mask)))
        return torch.cat(outputs, dim=0)

    async def _forward(self, hidden, position_ids, attention_mask) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        position, failures = 0, 0
        while position < self.num_blocks:
            span = BlockRange(position, self.num_blocks)
            chain = await loop.run_in_executor(None, self.routes.chain, span, 0, True)
            hop = chain[0]
            request = pb.ForwardRequest(
                start_block=hop.span.start,
                end_block=hop.span.end,
                hidden=tensors.to_proto(hidden.to(self.server_dtype(hop.peer_id)), self.compression_for(hop.peer_id)),
                position_ids=tensors.to_proto(position_ids),
                compression=self.compression_for(hop.peer_id),
                membership=self.membership.proof_for(hop.peer_id),
            )
            voucher = self.vouchers.current()
            if voucher is not None:
                request.voucher.CopyFrom(voucher)
            if attention_mask is not None:
                request.attention_mask.CopyFrom(tensors.to_proto(attention_mask))
            timeout = self.config.step_timeout + self.config.step_timeout_per_token * hidden.shape[0] * hidden.shape[1]
            try:
                response = await call_forward(self.p2p, hop.peer_id, request, timeout)
                output = tensors.from_proto(response.hidden, "hidden")
                if output.shape != hidden.shape:
                    raise ServerFailure(hop.peer_id, f"answered shape {list(output.shape)}")
            except (ServerFailure, StamenError) as failure:
                failure = failure if isinstance(failure, ServerFailure) else ServerFailure(hop.peer_id, str(failure))
                if failure.is_client_error:
                    raise failure.cause from failure
                failures += 1
                if failures > self.config.max_retries:
                    raise StamenError(f"forward failed after {failures} attempts; last: {failure}") from failure
                self.routes.ban(failure.peer_id, failure.reason)
                continue
            self.routes.mark_ok(hop.peer_id)
            hidden = output.to(hidden.dtype)
            self.receipts.add(hop.peer_id, hidden.shape[0] * hidden.shape[1] * len(hop.span))
            position = hop.span.end
        return hidden

    async def _stop_receipting(self) -> None:
        self._receipting.cancel()
        await asyncio.wait_for(self.receipts.send_due(self.p2p, self.membership), RECEIPT_FLUSH_SECONDS)

    def shutdown(self) -> None:
        try:
            self.loop.run(self._stop_receipting(), timeout=RECEIPT_FLUSH_SECONDS + 1)
        except Exception:
            logger.debug("Final receipts not handed out", exc_info=True)
        try:
            self.loop.run(self.p2p.shutdown(), timeout=5)
        except Exception:
            logger.debug("p2p shutdown failed", exc_info=True)
        self.loop.stop()
        self.dht.shutdown()
