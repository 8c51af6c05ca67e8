//! Malformed recipes, overrides and data files: every one exits non-zero
//! (2 for recipe and usage mistakes, 1 for bad data at run time) with a
//! message that names the file and the key, line or row, and never panics.

mod common;

use common::{Project, models_dir, shared_dir};

struct Case {
    name: &'static str,
    /// The recipe body after the `[recipe]`/`[model]` header (or the whole
    /// file when it starts with `#whole`).
    recipe: String,
    /// Extra files: (path, contents).
    files: Vec<(&'static str, &'static str)>,
    /// Arguments after the subcommand and recipe.
    args: Vec<&'static str>,
    /// `run` or `validate`.
    command: &'static str,
    code: i32,
    /// Every one of these must appear in stderr.
    expect: Vec<&'static str>,
}

fn case(name: &'static str, recipe: &str, code: i32, expect: &[&'static str]) -> Case {
    Case {
        name,
        recipe: recipe.to_string(),
        files: vec![],
        args: vec![],
        command: "run",
        code,
        expect: expect.to_vec(),
    }
}

impl Case {
    fn files(mut self, files: &[(&'static str, &'static str)]) -> Case {
        self.files = files.to_vec();
        self
    }
    fn args(mut self, args: &[&'static str]) -> Case {
        self.args = args.to_vec();
        self
    }
}

const DATA: &str = "[stages.data]\nkind = \"fetch-dataset\"\nsource = \"d.jsonl\"\n";
const CHAT: &str = "[stages.chat]\nkind = \"format-chat\"\ndataset = \"data\"\n";
const TOKENS: &str = "[stages.tokens]\nkind = \"tokenize\"\nconversations = \"chat\"\n";
const GOOD_ROWS: &str = "{\"question\": \"q\", \"answer\": \"a\"}\n";

fn cases() -> Vec<Case> {
    let parquet = shared_dir()
        .join("hf/hub/datasets--shawhin--tool-use-finetuning/snapshots/0000000000000000000000000000000000000001/data/train-00000-of-00001.parquet");
    let parquet = Box::leak(parquet.display().to_string().into_boxed_str());
    let all = format!("{DATA}{CHAT}{TOKENS}");
    vec![
        case(
            "unknown top-level table",
            "#whole\n[recpie]\nname = \"x\"\n",
            2,
            &["bad.toml:2:", "unknown key `recpie`", "did you mean `recipe`"],
        ),
        case(
            "unknown stage key",
            &format!("{DATA}{CHAT}{TOKENS}max_lne = 5\n"),
            2,
            &["bad.toml:14:", "stages.tokens.max_lne", "did you mean `max_len`"],
        ),
        case(
            "wrong type",
            &format!("{DATA}{CHAT}{TOKENS}max_len = \"long\"\n"),
            2,
            &["bad.toml:14:11", "stages.tokens.max_len", "invalid type"],
        ),
        case(
            "unknown kind",
            "[stages.data]\nkind = \"fetch-datset\"\n",
            2,
            &["bad.toml:6:", "did you mean `fetch-dataset`"],
        ),
        case(
            "missing kind",
            "[stages.data]\nsource = \"d.jsonl\"\n",
            2,
            &["bad.toml:", "missing field `kind`", "every stage needs a `kind`"],
        ),
        case(
            "dangling reference",
            &format!("{DATA}{CHAT}[stages.tokens]\nkind = \"tokenize\"\nconversations = \"chta\"\n"),
            2,
            &["bad.toml:13:", "stages.tokens.conversations", "no stage is named `chta`", "did you mean `chat`"],
        ),
        case(
            "cycle",
            "[stages.a]\nkind = \"format-chat\"\ndataset = \"b\"\n[stages.b]\nkind = \"format-chat\"\ndataset = \"a\"\n",
            2,
            &["bad.toml:", "cycle", "a → b → a"],
        ),
        case(
            "reference to the wrong kind",
            &format!("{DATA}[stages.tokens]\nkind = \"tokenize\"\nconversations = \"data\"\n"),
            2,
            &["bad.toml:10:", "stages.tokens.conversations", "must name a stage of kind format-chat"],
        ),
        case(
            "unknown device",
            "#whole\n[recipe]\nname = \"x\"\ndevice = \"gpu\"\n[model]\nbase = \"m\"\n[stages.data]\nkind = \"fetch-dataset\"\nsource = \"d.jsonl\"\n",
            2,
            &["bad.toml:4:", "recipe.device", "cuda:N"],
        ),
        case(
            "missing [model]",
            "#whole\n[recipe]\nname = \"x\"\n[stages.data]\nkind = \"fetch-dataset\"\nsource = \"d.jsonl\"\n",
            2,
            &["bad.toml:", "missing field `model`"],
        ),
        case("no stages", "[stages]\n", 2, &["bad.toml", "no stages"]),
        case(
            "fetch without a source",
            "[stages.data]\nkind = \"fetch-dataset\"\n",
            2,
            &["bad.toml:5:", "stages.data.source", "needs `source` or `files`"],
        ),
        case(
            "fraction out of range",
            &format!("{DATA}[[stages.data.keep]]\nfraction = 1.5\n"),
            2,
            &["bad.toml:", "stages.data.keep", "1.5"],
        ),
        case(
            "wrong type in an array of tables",
            &format!("{DATA}[[stages.data.keep]]\nwhere = {{ a = 1 }}\nfraction = \"half\"\n"),
            2,
            &["bad.toml:10:12", "stages.data.keep.fraction", "invalid type"],
        ),
        case(
            "wrong type in an inline table",
            "[stages.data]\nkind = \"fetch-dataset\"\nfiles = { train = 3 }\n",
            2,
            &["bad.toml:7:19", "stages.data.files.train", "invalid type"],
        ),
        case("toml syntax error", "[stages.data]\nkind = \n", 2, &["bad.toml:6:"]),
        case(
            "max_len too small",
            &format!("{all}max_len = 1\n"),
            2,
            &["bad.toml:14:", "stages.tokens.max_len", "too small"],
        ),
        case(
            "invalid stage name",
            "[stages.\"a b\"]\nkind = \"fetch-dataset\"\nsource = \"d.jsonl\"\n",
            2,
            &["bad.toml:", "invalid stage name `a b`"],
        ),
        case("malformed --set", DATA, 2, &["--set `nonsense` is not KEY=VALUE"]).args(&["--set", "nonsense"]),
        case("--set through a value", DATA, 2, &["recipe.name` is not a table"]).args(&["--set", "recipe.name.x=1"]),
        case("--set of an unknown key", DATA, 2, &["bad.toml", "unknown key `sorce`", "did you mean `source`"])
            .args(&["--set", "stages.data.sorce=x"]),
        case("unknown --until stage", &all, 2, &["--until `tokns`", "did you mean `tokens`"])
            .args(&["--until", "tokns"]),
        case("missing data file", DATA, 1, &["bad.toml", "source = \"d.jsonl\"", "no such file"]),
        case("malformed jsonl row", DATA, 1, &["d.jsonl:2:", "not valid JSON"])
            .files(&[("d.jsonl", "{\"a\": 1}\n{\"a\": 2,,}\n")]),
        case("jsonl row that is not an object", DATA, 1, &["d.jsonl:1:", "expected a JSON object, found an array"])
            .files(&[("d.jsonl", "[1, 2]\n")]),
        case(
            "malformed csv row",
            "[stages.data]\nkind = \"fetch-dataset\"\nsource = \"d.csv\"\n",
            1,
            &["d.csv:3:", "malformed CSV row"],
        )
        .files(&[("d.csv", "a,b\n1,2\n3\n")]),
        case(
            "unsupported file type",
            "[stages.data]\nkind = \"fetch-dataset\"\nsource = \"d.txt\"\n",
            1,
            &["d.txt", "unsupported data file type"],
        )
        .files(&[("d.txt", "hello")]),
        case(
            "parquet without the named column",
            &format!(
                "[stages.data]\nkind = \"fetch-dataset\"\nsource = \"{parquet}\"\ncolumns = [\"query\", \"answer\"]\n"
            ),
            1,
            &["train-00000-of-00001.parquet", "row 0", "no column `answer`", "query_type"],
        ),
        case(
            "split that does not exist",
            &format!("{DATA}splits = [\"test\"]\n"),
            1,
            &["split `test`", "found: train"],
        )
        .files(&[("d.jsonl", GOOD_ROWS)]),
        case(
            "filter on a missing column",
            &format!("{DATA}[[stages.data.keep]]\nwhere = {{ kind = \"x\" }}\n"),
            1,
            &["keep[0]", "no column `kind`"],
        )
        .files(&[("d.jsonl", GOOD_ROWS)]),
        case(
            "template that raises",
            &format!("{DATA}{CHAT}"),
            1,
            &["stage `chat`", "split `train`, row 0", "the chat template raised: no user turns allowed"],
        )
        .files(&[("d.jsonl", GOOD_ROWS), ("t.jinja", "{{ raise_exception('no user turns allowed') }}")])
        .args(&["--set", "model.chat_template=t.jinja"]),
        case("template file missing", &format!("{DATA}{CHAT}"), 1, &["chat_template = \"nope.jinja\"", "built-in"])
            .files(&[("d.jsonl", GOOD_ROWS)])
            .args(&["--set", "model.chat_template=nope.jinja"]),
        case(
            "messages column missing",
            &format!("{DATA}{CHAT}messages_column = \"trace\"\n"),
            1,
            &["split `train`, row 0", "no column `trace`"],
        )
        .files(&[("d.jsonl", GOOD_ROWS)]),
        case("row without an assistant turn", &format!("{DATA}{CHAT}"), 1, &["row 0", "no assistant turn"])
            .files(&[("d.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n")]),
        case("unknown message role", &format!("{DATA}{CHAT}"), 1, &["row 0", "role `narrator`"])
            .files(&[("d.jsonl", "{\"messages\": [{\"role\": \"narrator\", \"content\": \"hi\"}]}\n")]),
        case(
            "model directory missing",
            &format!("{DATA}{CHAT}"),
            1,
            &["bad.toml", "[model] base = \"", "fetch-models.sh"],
        )
        .files(&[("d.jsonl", GOOD_ROWS)])
        .args(&["--set", "model.base=no/such/dir"]),
        case(
            "examples all longer than max_len with drop",
            &format!("{all}max_len = 2\ntruncation = \"drop\"\n"),
            1,
            &["split `train`", "no example left", "raise max_len"],
        )
        .files(&[("d.jsonl", GOOD_ROWS)]),
    ]
}

#[test]
fn malformed_recipes_and_data_fail_clearly() {
    let Some(models) = models_dir() else { return };
    let header =
        format!("[recipe]\nname = \"bad\"\n[model]\nbase = \"{}\"\n", models.join("qwen3-tokenizer").display());
    let cases = cases();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in &cases {
        let p = Project::new();
        let text = match c.recipe.strip_prefix("#whole\n") {
            Some(whole) => format!("#\n{whole}"),
            None => format!("{header}{}", c.recipe),
        };
        p.write("bad.toml", &text);
        for (path, contents) in &c.files {
            p.write(path, contents);
        }
        let mut args = vec![c.command, "bad.toml"];
        args.extend(&c.args);
        let out = p.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        if out.status.code() != Some(c.code) {
            problems.push(format!("exit code {:?}, expected {}", out.status.code(), c.code));
        }
        if stderr.contains("panicked") {
            problems.push("panicked".into());
        }
        for e in &c.expect {
            if !stderr.contains(e) {
                problems.push(format!("missing `{e}`"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n--- stderr:\n{stderr}", c.name, problems.join(", ")));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn a_missing_recipe_file_is_a_usage_error() {
    let p = Project::new();
    let out = p.run(&["run", "nope.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.toml") && stderr.contains("cannot read the recipe"), "{stderr}");
    let out = p.run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

/// A GGUF alone whose vocabulary is of a kind not read from GGUF metadata
/// here (a Unigram `t5` one): tokenizing says what to provide and why.
#[test]
fn a_gguf_whose_vocabulary_is_not_read_here_says_what_to_provide() {
    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    let p = Project::new();
    std::fs::create_dir_all(p.path("alone")).unwrap();
    let embeddings = candle_core::Tensor::zeros((2, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let embeddings = QTensor::quantize(&embeddings, GgmlDType::F32).unwrap();
    let tokens =
        gguf_file::Value::Array(vec![gguf_file::Value::String("a".into()), gguf_file::Value::String("b".into())]);
    let metadata = [
        ("general.architecture", gguf_file::Value::String("llama".into())),
        ("tokenizer.ggml.model", gguf_file::Value::String("t5".into())),
        ("tokenizer.ggml.tokens", tokens),
    ];
    let metadata: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(p.path("alone/t5.gguf")).unwrap();
    gguf_file::write(&mut file, &metadata, &[("token_embd.weight", &embeddings)]).unwrap();
    p.write(
        "r.toml",
        &format!(
            "[recipe]\nname = \"alone\"\n[model]\nbase = \"alone/t5.gguf\"\nchat_template = \"chatml\"\n[stages.data]\nkind = \"fetch-dataset\"\n\
             source = \"{}\"\n[stages.chat]\nkind = \"format-chat\"\ndataset = \"data\"\n[stages.tokens]\n\
             kind = \"tokenize\"\nconversations = \"chat\"\n",
            p.write("qa.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n").display()
        ),
    );
    let out = p.run(&["run", "r.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for want in ["has no tokenizer.json", "`t5`", "[model] tokenizer"] {
        assert!(stderr.contains(want), "missing `{want}`: {stderr}");
    }
}
