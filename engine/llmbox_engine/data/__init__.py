"""Training data: sources -> records -> validated canonical examples -> tokens -> batches.

`load_examples` is the torch-free front half (what `llmbox data` shows); `render` and `batching`
turn examples into model inputs.
"""

from llmbox_engine.data.canonical import Example, Message, Origin, Task
from llmbox_engine.data.ingest import IngestResult, load_examples
from llmbox_engine.data.split import split_examples

__all__ = ["Example", "IngestResult", "Message", "Origin", "Task", "load_examples", "split_examples"]
