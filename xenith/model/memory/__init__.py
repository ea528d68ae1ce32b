"""Chunk-summary memory: a summarizer, a bank of summaries, short-term keys/values.

With `config.model.memory.chunk_size` C > 0, `build.make_model` gives a `MemoryDecoder`
(`decoder.py`), which reads its input as consecutive chunks of C tokens. Each chunk
attends to itself, to the stream's last R keys before it (short-term memory) and, in the
memory layers, to the bank's summaries (`attention.py`). After each chunk the
`Summarizer` (`summarizer.py`: S learned queries cross-attending to the chunk's final
hidden states) writes S summaries into the bank, evicting the least used or least
recently read (`bank.py`); windowed layers also keep the first G tokens (global tokens).
Everything the model carries between chunks and calls is one `MemoryState`
(`state.py`), which `save_bank` / `load_bank` keep in a .npz.
"""

from xenith.model.memory.config import enabled
from xenith.model.memory.config import is_memory_layer
from xenith.model.memory.decoder import MemoryDecoder
from xenith.model.memory.state import MemoryState
from xenith.model.memory.state import init_state
from xenith.model.memory.state import load_bank
from xenith.model.memory.state import save_bank
