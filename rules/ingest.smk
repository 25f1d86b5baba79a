rule ingest_table:
    """A ladder's results table (long or wide layout) as runs.parquet, checked before fitting."""
    localrule: True
    input:
        config["results_table"],
    output:
        layout.runs_table(),
    params:
        settings=ingest_settings_json(),
    log:
        layout.log("ingest_table"),
    benchmark:
        layout.benchmark("ingest_table")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.ingest --table {input} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"
