"""The page allocator of the KV pool: a free list, one page table per slot, and a reference count per page.

No torch here: :class:`~rank1_hf.engine.kv_cache.PagedCache` copies the tables it is given to the devices, and
the scheduler (scheduler.py) decides with them alone.

Shared prompt pages: the full pages of a prompt are published under a key chained from the page before
(the page it follows, and its token ids), so a page is found only when every page before it matched too.
A row whose prompt starts with pages another row holds takes those pages by reference instead of
prefilling them: their keys and values are the ones it would have written (same tokens, same positions).
A page goes back to the free list, and stops being found, when its last holder releases it. A shared page
is never written: a row writes from its first position past its shared pages, which starts a fresh page.
"""

from __future__ import annotations

from ..model.kv_budget import PAGE_SIZE, pages_for

# The key of a slot's first page: no page is numbered -1.
_ROOT = -1


class PageAllocator:
    """Pages 1..pages-1 of a pool (page 0 is scratch, never given out) for ``slots`` page tables of at
    most ``row_pages`` pages each."""

    def __init__(self, slots: int, pages: int, row_pages: int, page_size: int = PAGE_SIZE):
        self.slots = slots
        self.pages = max(2, pages)
        self.row_pages = row_pages
        self.page_size = page_size
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.refs = [0] * self.pages
        self.free = list(range(self.pages - 1, 0, -1))  # a stack
        self.dirty: set[int] = set()  # slots whose table changed since the cache last copied it
        self._published: dict[tuple[int, tuple[int, ...]], int] = {}  # (page before, token ids) -> page
        self._key: dict[int, tuple[int, tuple[int, ...]]] = {}  # page -> its published key

    @property
    def free_pages(self) -> int:
        return len(self.free)

    def held(self, slot: int) -> int:
        return len(self.tables[slot])

    # ---- growing and releasing -----------------------------------------------------------------------

    def grow(self, slot: int, tokens: int) -> bool:
        """Give ``slot`` fresh pages for its first ``tokens`` tokens; False (nothing taken) when short."""
        table = self.tables[slot]
        need = pages_for(tokens, self.page_size) - len(table)
        if need <= 0:
            return True
        if need > len(self.free) or len(table) + need > self.row_pages:
            return False
        for _ in range(need):
            page = self.free.pop()
            self.refs[page] = 1
            table.append(page)
        self.dirty.add(slot)
        return True

    def shrink(self, slot: int, tokens: int) -> None:
        """Give back ``slot``'s pages past its first ``tokens`` tokens (taken for drafts it did not keep)."""
        table = self.tables[slot]
        keep = pages_for(tokens, self.page_size)
        while len(table) > keep:
            self._drop(table.pop())
            self.dirty.add(slot)

    def release(self, slot: int) -> None:
        """Drop ``slot``'s hold on its pages; a page nobody holds any more goes back to the free list."""
        for page in reversed(self.tables[slot]):
            self._drop(page)
        self.tables[slot] = []
        self.dirty.add(slot)

    def _drop(self, page: int) -> None:
        """One hold on ``page`` less; a page nobody holds goes back to the free list and is no longer found."""
        self.refs[page] -= 1
        if self.refs[page] == 0:
            key = self._key.pop(page, None)
            if key is not None:
                del self._published[key]
            self.free.append(page)

    def move(self, source: int, target: int) -> None:
        """Slot ``target`` (empty) takes over ``source``'s pages: compaction moves no keys or values."""
        self.tables[target], self.tables[source] = self.tables[source], []
        self.dirty.update((source, target))

    # ---- shared prompt pages -------------------------------------------------------------------------

    def writable_from(self, slot: int, position: int) -> bool:
        """Whether ``slot`` may write its positions from ``position`` on: no page it holds from there on is
        held by another slot too (a shared page is never written)."""
        return all(self.refs[page] == 1 for page in self.tables[slot][position // self.page_size :])

    def shareable(self, prompt: list[int], limit: int) -> list[int]:
        """The held pages that hold ``prompt``'s first full pages, in order (at most ``limit`` of them)."""
        found: list[int] = []
        before, size = _ROOT, self.page_size
        for k in range(min(limit, len(prompt) // size)):
            page = self._published.get((before, tuple(prompt[k * size : (k + 1) * size])))
            if page is None:
                break
            found.append(page)
            before = page
        return found

    def share(self, slot: int, pages: list[int]) -> None:
        """An empty ``slot`` starts with ``pages`` (from :meth:`shareable`), held by reference."""
        assert not self.tables[slot], "a slot shares pages only before it holds any"
        for page in pages:
            self.refs[page] += 1
        self.tables[slot] = list(pages)
        self.dirty.add(slot)

    def publish(self, slot: int, prompt: list[int]) -> None:
        """Make ``slot``'s full pages of ``prompt`` findable by rows admitted later (pages already found
        keep their first publisher)."""
        before, size, table = _ROOT, self.page_size, self.tables[slot]
        for k in range(min(len(table), len(prompt) // size)):
            key = (before, tuple(prompt[k * size : (k + 1) * size]))
            page = self._published.setdefault(key, table[k])
            if page == table[k]:
                self._key[page] = key
            before = table[k]
