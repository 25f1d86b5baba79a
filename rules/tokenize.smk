rule tokenizer:
    """Train a byte-level BPE on one dataset's training split, or save a named tokenizer."""
    input:
        tokenizer_inputs,
    output:
        directory(layout.tokenizer()),
    params:
        command=tokenizer_command,
        vocab_size=config["tokenizer"]["vocab_size"],
    threads: 2
    log:
        layout.log("tokenizer"),
    benchmark:
        layout.benchmark("tokenizer")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.tokenization {params.command} --vocab-size {params.vocab_size}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule tokenize:
    """Encode one split as memory-mapped token shards, an end-of-text id after each document."""
    input:
        tokenizer=rules.tokenizer.output,
        corpus=layout.corpus_split("{dataset}", "{split}"),
    output:
        directory(layout.tokens("{dataset}", "{split}")),
    params:
        shard_tokens=config["tokenizer"]["shard_tokens"],
    threads: 2
    log:
        layout.log("tokenize", "{dataset}-{split}"),
    benchmark:
        layout.benchmark("tokenize", "{dataset}-{split}")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.tokenization encode --tokenizer {input.tokenizer}"
        " --corpus {input.corpus} --out {output} --shard-tokens {params.shard_tokens}"
        " --threads {threads} > {log} 2>&1"
