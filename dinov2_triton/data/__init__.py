"""Stage 1, data: the embedded Fashion-MNIST or an ImageFolder tree -> a validated data
folder (manifest.csv, labels.txt, summary.json) and its reader (``data.datasets``)."""
