rule prepare:
    """Build one dataset's documents and split them into train and validation."""
    output:
        train=layout.corpus_split("{dataset}", "train"),
        val=layout.corpus_split("{dataset}", "val"),
        manifest=layout.corpus_manifest("{dataset}"),
    params:
        source=lambda wildcards: as_json(config["datasets"][wildcards.dataset]["source"]),
        val_fraction=lambda wildcards: config["datasets"][wildcards.dataset]["val_fraction"],
        out_dir=lambda wildcards: layout.corpus(wildcards.dataset),
        cache_dir=layout.sources_cache(),
    log:
        layout.log("prepare", "{dataset}"),
    benchmark:
        layout.benchmark("prepare", "{dataset}")
    conda:
        "../envs/data.yaml"
    shell:
        "python -m workflow.prepare --name {wildcards.dataset} --source {params.source:q}"
        " --val-fraction {params.val_fraction} --out-dir {params.out_dir}"
        " --cache-dir {params.cache_dir} > {log} 2>&1"
