"""Symmetric buffers: one device allocation of the same size per rank of a group, mapped by
every other rank of the host over CUDA IPC, so kernels can store straight into a peer's
memory through its pointer."""

from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist

from moe_plugin.kernels import binding


class _DeviceArray:
    """A raw device allocation described by `__cuda_array_interface__` (bytes, 1-D)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


class SymmetricBuffer:
    """`nbytes` zeroed bytes on `device` on each rank of `group`, mapped by every peer.

    Collective: every rank of the group builds it with the same `nbytes`, and calls
    `destroy()`. `.local` is a uint8 tensor over this rank's allocation, `.peer_addresses` the
    address of every rank's allocation as mapped in this process (own included). Views taken
    from `.local` are invalid after `destroy()`.
    """

    def __init__(self, nbytes: int, group: dist.ProcessGroup, device: torch.device) -> None:
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        self.nbytes = int(nbytes)
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        index = self.device.index
        handle_size = binding.call("moe_ipc_handle_size")
        handle = ctypes.create_string_buffer(handle_size)
        local = ctypes.c_void_p()
        binding.call(
            "moe_sym_alloc",
            device=index,
            nbytes=self.nbytes,
            ptr_out=ctypes.byref(local),
            handle_out=handle,
        )
        self._local_address = int(local.value or 0)
        self._opened: list[int] = []
        self._alive = True
        handles: list[bytes | None] = [None] * self.world_size
        dist.all_gather_object(handles, handle.raw, group=group)
        try:
            addresses = []
            for r, h in enumerate(handles):
                if r == self.rank:
                    addresses.append(self._local_address)
                    continue
                peer = ctypes.c_void_p()
                binding.call(
                    "moe_sym_open",
                    device=index,
                    handle_in=ctypes.create_string_buffer(h, handle_size),
                    ptr_out=ctypes.byref(peer),
                )
                self._opened.append(int(peer.value or 0))
                addresses.append(int(peer.value or 0))
        except RuntimeError as e:
            self._release()
            binding.call("moe_sym_free", device=index, ptr=self._local_address)
            raise RuntimeError(
                f"rank {self.rank}: could not map a peer's buffer over CUDA "
                f"IPC (are all ranks on one host with peer access?): {e}"
            ) from e
        self.peer_addresses: list[int] = addresses
        self.local = torch.as_tensor(
            _DeviceArray(self._local_address, self.nbytes), device=self.device
        )

    def view(
        self, offset: int, shape: tuple[int, ...] | list[int], dtype: torch.dtype
    ) -> torch.Tensor:
        """A tensor of `shape` and `dtype` over the local buffer's bytes from `offset`
        (aligned to the dtype's size), contiguous."""
        numel = 1
        for d in shape:
            numel *= int(d)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        if offset % itemsize or offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(
                f"view of {nbytes} bytes at offset {offset} does not fit the "
                f"{self.nbytes}-byte buffer with {itemsize}-byte alignment"
            )
        return self.local[offset : offset + nbytes].view(dtype).view(*shape)

    def destroy(self) -> None:
        """Collective: wait until every rank stops using the buffers, unmap the peers', free
        this rank's. Safe to call twice."""
        if not self._alive:
            return
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self._release()
        # Owners free only after every peer has unmapped.
        dist.barrier(group=self.group)
        binding.call("moe_sym_free", device=self.device.index, ptr=self._local_address)

    def _release(self) -> None:
        self._alive = False
        self.local = torch.empty(0, dtype=torch.uint8)
        for address in self._opened:
            binding.call("moe_sym_close", device=self.device.index, ptr=address)
        self._opened = []
