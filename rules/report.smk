"""The report's figures and table: `snakemake --report report.html` collects every output
marked report() here into one self-contained page (captions in report/)."""


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
            labels={"figure": "loss vs compute; error vs loss"},
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


rule target_table:
    """Every measured target's prediction, interval, actual value and relative error."""
    localrule: True
    input:
        out("predictions.parquet"),
    output:
        report(
            out("plots", "targets.html"),
            caption="../report/targets.rst",
            category="Scaling laws",
            labels={"figure": "relative errors of the targets"},
        ),
    params:
        loss_eval=error_loss_eval(config),
    log:
        out("logs", "target_table.log"),
    benchmark:
        out("benchmarks", "target_table.tsv")
    conda:
        "../envs/fit.yaml"
    shell:
        "python -m workflow.targets --predictions {input} --loss-eval {params.loss_eval}"
        " --out {output} > {log} 2>&1"


if not config["released_dir"]:

    rule plot_curves:
        """Every run's training loss against tokens: where a diverged or cut-short run shows."""
        localrule: True
        input:
            curve_files(),
        output:
            report(
                out("plots", "curves.png"),
                caption="../report/curves.rst",
                category="Training",
                labels={"figure": "training curves"},
            ),
        params:
            runs=curve_runs(),
        log:
            out("logs", "plot_curves.log"),
        benchmark:
            out("benchmarks", "plot_curves.tsv")
        conda:
            "../envs/fit.yaml"
        shell:
            "python -m workflow.curves --runs {params.runs:q} --out {output} > {log} 2>&1"
