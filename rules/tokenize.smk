rule tokenizer:
    """Train a byte-level BPE on one dataset's training split, or save a named tokenizer."""
    input:
        tokenizer_inputs,
    output:
        directory(out("tokenizer")),
    params:
        command=tokenizer_command,
        vocab_size=config["tokenizer"]["vocab_size"],
    threads: 2
    log:
        out("logs", "tokenizer.log"),
    benchmark:
        out("benchmarks", "tokenizer.tsv")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.tokenization {params.command} --vocab-size {params.vocab_size}"
        " --threads {threads} --out {output} > {log} 2>&1"


rule tokenize:
    """Encode one split as memory-mapped token shards, an end-of-text id after each document."""
    input:
        tokenizer=rules.tokenizer.output,
        corpus=out("corpus", "{dataset}", "{split}.jsonl"),
    output:
        directory(out("tokens", "{dataset}", "{split}")),
    params:
        shard_tokens=config["tokenizer"]["shard_tokens"],
    threads: 2
    log:
        out("logs", "tokenize", "{dataset}-{split}.log"),
    benchmark:
        out("benchmarks", "tokenize", "{dataset}-{split}.tsv")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.tokenization encode --tokenizer {input.tokenizer}"
        " --corpus {input.corpus} --out {output} --shard-tokens {params.shard_tokens}"
        " --threads {threads} > {log} 2>&1"
