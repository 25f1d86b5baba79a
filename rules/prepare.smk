rule prepare:
    """Build one dataset's documents and split them into train and validation."""
    output:
        train=out("corpus", "{dataset}", "train.jsonl"),
        val=out("corpus", "{dataset}", "val.jsonl"),
        manifest=out("corpus", "{dataset}", "manifest.json"),
    params:
        source=lambda wildcards: as_json(config["datasets"][wildcards.dataset]["source"]),
        val_fraction=lambda wildcards: config["datasets"][wildcards.dataset]["val_fraction"],
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        cache_dir=out("sources"),
    log:
        out("logs", "prepare", "{dataset}.log"),
    benchmark:
        out("benchmarks", "prepare", "{dataset}.tsv")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.prepare --name {wildcards.dataset} --source {params.source:q}"
        " --val-fraction {params.val_fraction} --out-dir {params.out_dir}"
        " --cache-dir {params.cache_dir} > {log} 2>&1"
