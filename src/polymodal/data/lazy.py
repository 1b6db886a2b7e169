"""Documents read one at a time from a source too large to hold: a `Sequence` that reads document i when
indexed (media decoded then), streams every document's text without its media (`texts`), and picks the
documents checked before training (`checked`), so a 100,000-document set costs memory for neither."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from polymodal.data.documents import Document

CHECK_ALL_UP_TO = 2048  # documents validated before training: all of a set this small, else this many spread over it


class LazyDocuments(Sequence):
    """Subclasses give `__len__`, `document(i)` and `texts()`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def document(self, i: int) -> Document:
        raise NotImplementedError

    def texts(self) -> Iterator[str]:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.document(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        return self.document(int(i) % len(self))


def document_texts(docs: Sequence[Document]) -> Iterable[str]:
    """Every text of the documents, in order; a lazy source's without reading its media."""
    if isinstance(docs, LazyDocuments):
        return docs.texts()
    return (text for doc in docs for text in doc.texts)


def checked(docs: Sequence[Document]) -> Sequence[Document]:
    """What is validated before training: every document of a small set, else CHECK_ALL_UP_TO of them spread
    evenly from the first to the last (the rest are checked as a batch reads them)."""
    n = len(docs)
    if n <= CHECK_ALL_UP_TO:
        return docs
    return [docs[i * (n - 1) // (CHECK_ALL_UP_TO - 1)] for i in range(CHECK_ALL_UP_TO)]
