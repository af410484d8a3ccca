"""buildseg: a competition pipeline for building extraction (decode RLE -> folds -> train -> submit)."""
