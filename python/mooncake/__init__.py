"""Mooncake: a torch.distributed backend (``backend="mooncake"``) over a C collective engine.

``import mooncake`` registers the backend. Without the import, installed entry points do it:
``torch.distributed.backends`` (torch >= 2.14, loaded lazily by ``init_process_group``) and
``torch.backends`` (older torch, loaded while ``import torch`` runs).
"""

import sys

__version__ = "0.1.0"

__all__ = ["__version__"]


def _create_backend(opts, pg_options=None):
    """Extended-API creator: called by torch once per group on its member ranks."""
    from . import _C  # loads libmooncake only when a group is actually created

    return _C._create_backend(
        opts.store, opts.group_rank, opts.group_size, opts.timeout, opts.group_id or ""
    )


def _register_c10d_backend():
    """Register ``"mooncake"`` with torch.distributed (idempotent). Entry-point target."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("mooncake needs torch built with distributed support")
    plugin = getattr(dist.Backend, "_plugins", {}).get("MOONCAKE")
    if plugin is not None and plugin.creator_fn is _create_backend:
        _install_shrink_support()
        return
    dist.Backend.register_backend(
        "mooncake", _create_backend, extended_api=True, devices=["cpu"]
    )
    _install_shrink_support()


def _torch_is_importing():
    # importlib marks a module's spec while its top-level code runs; the torch.backends
    # entry point runs inside torch/__init__.py, when torch.distributed can't be imported yet.
    torch = sys.modules.get("torch")
    return torch is not None and getattr(getattr(torch, "__spec__", None), "_initializing", False)


def _torch_version():
    torch = sys.modules.get("torch")
    try:
        major, minor = str(torch.__version__).split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return (0, 0)


def _autoload():
    """``torch.backends`` entry point (torch < 2.14). Must never break ``import torch``."""
    if _torch_version() >= (2, 14):
        return  # the lazy torch.distributed.backends entry point registers on demand
    try:
        _register_c10d_backend()
    except Exception as err:  # noqa: BLE001 - a failure here would abort `import torch`
        import warnings

        warnings.warn(f"mooncake: backend not registered during torch import: {err}")




# ---- fault tolerance (docs/fault-tolerance.md) ----


def _mooncake_backend(group):
    import torch
    import torch.distributed as dist

    from . import _C

    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    backend = pg._get_backend(torch.device("cpu"))
    if not isinstance(backend, _C.MooncakeBackend):
        raise TypeError(f"group {pg.group_name!r} does not use the mooncake backend")
    return pg, backend


def failed_ranks(group=None) -> list:
    """Ranks of ``group`` (default: the default group) known to have failed, in group ranks."""
    return list(_mooncake_backend(group)[1].failed_ranks())


def shrink(group=None):
    """Collective over the surviving ranks of ``group``: they agree on who failed, then build a
    new group of the survivors (renumbered in rank order) without the store. Callers need not
    know who died. Like ``torch.distributed.shrink_group``, the old group is destroyed and, if
    it was the default group, the new one becomes the default group (other groups are
    destroyed). Raises ``DistBackendError`` if this rank was declared failed by the others."""
    from torch.distributed import distributed_c10d as c10d

    pg, backend = _mooncake_backend(group)
    info = c10d._prepare_shrink_target_group(pg)
    new_backend = backend.shrink_agreed()
    kept = set(new_backend.parent_ranks())
    members = c10d.get_process_group_ranks(pg)
    excluded = {members[r] for r in range(len(members)) if r not in kept}
    return c10d._finalize_shrunk_group(info, excluded, new_backend)


def _create_shrunk_group(new_backend, remaining_ranks, metadata, is_default_group):
    """Builds the ProcessGroup around a shrunk mooncake backend. torch's own version (2.15)
    registers a CPU backend as Gloo, which crashes DDP's logger (it casts the backend to
    ProcessGroupGloo), and clones the store connection, which blocks when the store's host
    died (e.g. rank 0 hosting a TCPStore). Here the backend is CUSTOM and the group shares
    the old store connection, so a shrink never needs the store."""
    import torch
    from torch.distributed import distributed_c10d as c10d

    name = metadata["new_group_name"]
    pg = c10d.ProcessGroup(c10d.PrefixStore(f"{name}/", metadata["store"]), new_backend.rank(),
                           new_backend.size())
    custom = c10d.ProcessGroup.BackendType.CUSTOM
    pg._register_backend(torch.device("cpu"), custom, new_backend)
    pg._set_default_backend(custom)
    if metadata.get("bound_device_id") is not None:
        pg.bound_device_id = metadata["bound_device_id"]
    pg._set_group_name(name)
    pg._set_group_desc("default:shrunken" if is_default_group
                       else f"{metadata['original_group_name']}:shrunk")
    if metadata.get("backend_config") is not None:
        c10d._world.pg_backend_config[pg] = metadata["backend_config"]
    return pg


def _install_shrink_support():
    """Routes torch's shrink finalisation (dist.shrink_group and mooncake.shrink) to
    _create_shrunk_group for mooncake backends; other backends keep torch's path."""
    from torch.distributed import distributed_c10d as c10d

    torch_create = getattr(c10d, "_create_shrunk_process_group", None)
    if torch_create is None or getattr(torch_create, "_mooncake", False):
        return

    def create(new_backend, remaining_ranks, metadata, is_default_group):
        from . import _C

        if isinstance(new_backend, _C.MooncakeBackend):
            return _create_shrunk_group(new_backend, remaining_ranks, metadata, is_default_group)
        return torch_create(new_backend, remaining_ranks, metadata, is_default_group)

    create._mooncake = True
    c10d._create_shrunk_process_group = create


__all__ += ["failed_ranks", "shrink"]


# last: registration installs helpers defined above
if not _torch_is_importing():
    _register_c10d_backend()
