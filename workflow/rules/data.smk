# Model, corpus and activation harvesting (darkmatter.data).
# With share_data_from, the same rules hard-link that experiment's finished folders instead
# (darkmatter.data.share), after checking they were made with this experiment's settings.


if EXP.share_data_from:
    SHARED = ExperimentPaths.of(EXP.share_data_from)
    for theirs, ours in [(SHARED.model_json, P.model_json), (SHARED.corpus, P.corpus)] + [
        (SHARED.activations(split), P.activations(split)) for split in ("train", "eval")]:
        if not theirs.exists() and not ours.exists():
            raise WorkflowError(f"share_data_from: {EXP.share_data_from}: {theirs} does not exist; run that "
                                "experiment first (it makes the model, corpus and activations this one shares).")

    rule prepare_model:
        input:
            str(SHARED.model_json),
        output:
            str(P.model_json),
        params:
            py=PY,
            settings=step_params(EXP, "prepare-model"),
            source=lambda w, input: os.path.dirname(input[0]),  # the whole model folder, not only model.json
            folder=lambda w, output: os.path.dirname(output[0]),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("prepare_model")),
        shell:  # the whole model folder; its model.json is the output
            share_shell("prepare-model", "{params.source:q}", "{params.folder:q}")

    rule prepare_corpus:
        input:
            str(SHARED.corpus),
        output:
            directory(str(P.corpus)),
        params:
            py=PY,
            settings=step_params(EXP, "prepare-corpus"),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("prepare_corpus")),
        shell:
            share_shell("prepare-corpus")

    rule harvest:
        input:
            lambda w: str(SHARED.activations(w.split)),
        output:
            directory(str(P.activations("{split}"))),
        params:
            py=PY,
            settings=lambda w: step_params(EXP, f"harvest-{w.split}"),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("harvest_{split}")),
        shell:
            share_shell("harvest-{wildcards.split}")

else:


    rule prepare_model:
        output:
            str(P.model_json),
        params:
            py=PY,
            model=step_params(EXP, "prepare-model"),
        threads: 1
        resources:
            **resources_of("prepare-model"),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("prepare_model")),
        shell:
            "{params.py:q} -m darkmatter.cli prepare-model --params {params.model:q} --out {output:q} > {log:q} 2>&1"


    rule prepare_corpus:
        input:
            model=rules.prepare_model.output[0],
        output:
            directory(str(P.corpus)),
        params:
            py=PY,
            corpus=step_params(EXP, "prepare-corpus"),
        threads: 1
        resources:
            **resources_of("prepare-corpus"),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("prepare_corpus")),
        shell:
            "{params.py:q} -m darkmatter.cli prepare-corpus --params {params.corpus:q} --model {input.model:q} "
            "--out {output:q} > {log:q} 2>&1"


    rule harvest:
        input:
            model=rules.prepare_model.output[0],
            corpus=rules.prepare_corpus.output[0],
        output:
            directory(str(P.activations("{split}"))),
        params:
            py=PY,
            harvest=lambda wildcards: step_params(EXP, f"harvest-{wildcards.split}"),
        threads: CORES
        resources:
            **resources_of("harvest"),
        benchmark:
            str(P.benchmark("harvest", "{split}")),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("harvest_{split}")),
        shell:
            "{params.py:q} -m darkmatter.cli --threads {threads} harvest --params {params.harvest:q} --model {input.model:q} "
            "--corpus {input.corpus:q} --split {wildcards.split} --out {output:q} > {log:q} 2>&1"
