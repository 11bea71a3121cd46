"""Reading prefixes: trained K/V slots in front of the prompt that teach the frozen reasoner how to read recalled
text (`prefix.ReadingPrefix`), and their offline training (`python -m memsplice.reading.train`)."""

from .prefix import ReadingPrefix, ReadingPrefixConfig, ReadingPrefixError

__all__ = ["ReadingPrefix", "ReadingPrefixConfig", "ReadingPrefixError"]
