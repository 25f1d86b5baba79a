rule fit:
    """Both forms of the loss law and the error law; every run predicted with a 95% interval."""
    localrule: True
    input:
        out("runs.parquet"),
    output:
        predictions=out("predictions.parquet"),
        fits=out("fits.parquet"),
    params:
        settings=fit_settings(),
    threads: 2
    log:
        out("logs", "fit.log"),
    benchmark:
        out("benchmarks", "fit.tsv")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.fit --runs {input} --settings {params.settings:q}"
        " --workers {threads} --predictions {output.predictions} --fits {output.fits}"
        " > {log} 2>&1"

