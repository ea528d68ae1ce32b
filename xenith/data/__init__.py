"""Documents -> TFDS array_record -> grain -> tokens -> packed batches."""
