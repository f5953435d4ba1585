"""The data side: SeqIO tasks -> global batches (`loader`), the demo's n-gram
yardstick (`baseline`). The only paxgpt room that imports TensorFlow and SeqIO."""
