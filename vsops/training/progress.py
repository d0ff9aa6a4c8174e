"""Progress bars for the training commands (tqdm on the main process, nothing elsewhere)."""
from __future__ import annotations

__all__ = ["progress_bar"]


class _Silent:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, desc: str, *, initial: int = 0):
    """A tqdm bar over ``total`` steps starting at ``initial``, or a silent stand-in."""
    if not enabled:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
