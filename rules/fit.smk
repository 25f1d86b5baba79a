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


rule plot:
    """Loss against compute per dataset, and error against loss, as in the paper's Figure 1."""
    localrule: True
    input:
        runs=out("runs.parquet"),
        predictions=out("predictions.parquet"),
        fits=out("fits.parquet"),
    output:
        report(
            out("plots", "scaling.png"),
            caption="../report/scaling.rst",
            category="Scaling laws",
        ),
    params:
        loss_eval=error_loss_eval(config),
    log:
        out("logs", "plot.log"),
    benchmark:
        out("benchmarks", "plot.tsv")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.plots --runs {input.runs} --predictions {input.predictions}"
        " --fits {input.fits} --loss-eval {params.loss_eval} --out {output} > {log} 2>&1"
