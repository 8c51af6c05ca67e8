//! The Ollama Modelfile's TEMPLATE, evaluated with Go-template semantics
//! (the `gtmpl` crate, an implementation of Go's text/template), renders the
//! same text as the Jinja chat template used in training.

mod common;

use std::collections::HashMap;

use gtmpl_value::Value;
use pipeline::stages::ollama_modelfile::{Family, Params};
use pipeline_infer::chat::{BUILTIN, ChatTemplate, Message};

fn go_render(template: &str, messages: &[Message]) -> String {
    let msgs = messages
        .iter()
        .map(|m| {
            let mut o = HashMap::new();
            o.insert("Role".to_string(), Value::from(m.role.as_str()));
            o.insert("Content".to_string(), Value::from(m.content.as_str()));
            Value::Object(o)
        })
        .collect();
    let mut ctx = HashMap::new();
    ctx.insert("Messages".to_string(), Value::Array(msgs));
    gtmpl::template(template, Value::Object(ctx)).unwrap()
}

fn conversations() -> Vec<Vec<Message>> {
    let m = Message::new;
    let call = "<tool_call>\n{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"北京\"}}\n</tool_call>";
    vec![
        vec![m("user", "Hi!")],
        vec![m("system", "Be brief."), m("user", "What is 2+2?")],
        vec![m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello."), m("user", "Bye")],
        vec![
            m("system", "<instructions>Use tools.</instructions>"),
            m("user", "Weather in Beijing?"),
            m("assistant", call),
            m("user", "<tool_result>\n{'temp': 21}\n</tool_result>"),
        ],
        vec![m("user", "多行\n文本"), m("assistant", "好的。"), m("user", "再见")],
    ]
}

fn check(jinja: &ChatTemplate, family: Family, bos: &str) {
    let go = family.go_template(&jinja.eos_token);
    for conv in conversations() {
        let want = jinja.render(&conv, None, true).unwrap();
        let got = go_render(&go, &conv);
        // Ollama's tokenizer adds BOS; the Jinja template writes it.
        assert_eq!(format!("{bos}{got}"), want, "{family:?} on {conv:?}");
    }
}

#[test]
fn go_templates_render_like_the_training_templates() {
    let builtin = |name: &str| BUILTIN.iter().find(|(n, _)| *n == name).unwrap().1;
    let gemma = ChatTemplate::new(builtin("gemma"), "<bos>", "<eos>").unwrap();
    assert_eq!(Family::of(&gemma.source), Some(Family::Gemma));
    check(&gemma, Family::Gemma, "<bos>");
    let chatml = ChatTemplate::new(builtin("chatml"), "", "<|im_end|>").unwrap();
    assert_eq!(Family::of(&chatml.source), Some(Family::ChatMl));
    check(&chatml, Family::ChatMl, "");

    // The real Gemma 3 template from the provisioned tokenizer_config.json.
    if let Some(models) = common::models_dir() {
        let tc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(models.join("gemma-3-270m/tokenizer_config.json")).unwrap()).unwrap();
        let real = ChatTemplate::new(tc["chat_template"].as_str().unwrap(), "<bos>", "<eos>").unwrap();
        check(&real, Family::of(&real.source).unwrap(), "<bos>");
    }
}

#[test]
fn alpaca_template_renders_single_turn_prompts_like_training() {
    let alpaca = ChatTemplate::new(BUILTIN.iter().find(|(n, _)| *n == "alpaca").unwrap().1, "", "</s>").unwrap();
    let go = Family::Alpaca.go_template("</s>");
    for conv in [
        vec![Message::new("user", "白点病怎么治？")],
        vec![Message::new("user", "Q1"), Message::new("assistant", "A1"), Message::new("user", "Q2")],
    ] {
        let want = alpaca.render(&conv, None, false).unwrap();
        assert_eq!(go_render(&go, &conv), want, "{conv:?}");
    }
}

#[test]
fn the_modelfile_stops_at_the_trained_end_of_turn() {
    let gemma = ChatTemplate::new(BUILTIN[0].1, "<bos>", "<eos>").unwrap();
    let params: Params = toml::from_str("gguf = \"g\"\nchat = \"c\"\nsystem = \"Be brief.\"").unwrap();
    let stops = pipeline_infer::generate::stop_tokens(&gemma.end_of_turn, &gemma.eos_token);
    let text = params.modelfile("r", Family::Gemma, "<eos>", &stops);
    assert!(text.contains("FROM ./model.gguf\n"), "{text}");
    assert!(text.contains("PARAMETER stop \"<end_of_turn>\"\n"), "{text}");
    assert!(text.contains("PARAMETER stop \"<eos>\"\n"), "{text}");
    assert!(text.contains("TEMPLATE \"\"\"{{- range $i, $m := .Messages }}"), "{text}");
    assert!(text.contains("SYSTEM \"\"\"Be brief.\"\"\""), "{text}");
}

/// Renders requests with Go's own text/template as Ollama builds them
/// (`tests/ollama/render.go`): per request, (prompt, tool-call tag, whether
/// Ollama would accept `tools`).
fn ollama_render(
    go: &std::path::Path,
    template: &str,
    requests: &[(serde_json::Value, serde_json::Value)],
) -> Vec<(String, String, bool)> {
    use std::io::Write;
    let body: Vec<serde_json::Value> = requests
        .iter()
        .map(|(messages, tools)| serde_json::json!({"template": template, "messages": messages, "tools": tools}))
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ollama");
    let mut child = std::process::Command::new(go)
        .args(["run", "render.go"])
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(&body).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "go run render.go failed");
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.iter()
        .map(|r| {
            (r["prompt"].as_str().unwrap().to_string(), r["tag"].as_str().unwrap().to_string(), r["uses_tools"] == true)
        })
        .collect()
}

/// Ollama (no binary installs here) renders `gemma-tools` conversations with
/// tools, calls and results as training did, accepts `tools` for it, and
/// reads calls at the tag the model was trained to emit.
#[test]
fn ollama_renders_native_tool_conversations_as_training_did() {
    let (Some(models), Some(go)) = (common::models_dir(), common::go()) else { return };
    let builtin = |name: &str| BUILTIN.iter().find(|(n, _)| *n == name).unwrap().1;
    let jinja = ChatTemplate::new(builtin("gemma-tools"), "<bos>", "<eos>").unwrap();
    assert_eq!(Family::of(&jinja.source), Some(Family::GemmaTools));
    let mut requests = common::native_tool_conversations(&models);
    let with_calls = requests.iter().filter(|(m, _)| m.to_string().contains("\"tool_calls\"")).count();
    let with_results = requests.iter().filter(|(m, _)| m.to_string().contains("\"role\":\"tool\"")).count();
    // What the dataset lacks: a system prompt beside the tools, two calls in
    // one turn, arguments Go's `json` would escape, an enum, non-ASCII.
    requests.push((
        serde_json::json!([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "北京和上海的天气？ Also is 3 > 2 & 1 < 2?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "c"}}},
                {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3 > 2 & 1 < 2", "digits": 2, "exact": true, "terms": [1, "a"]}}}]},
            {"role": "tool", "content": "21 C"},
            {"role": "tool", "content": "True"},
            {"role": "assistant", "content": "21 C in Beijing, and yes."},
            {"role": "user", "content": "Thanks"}
        ]),
        serde_json::json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather now.", "parameters": {
                "type": "object", "properties": {"unit": {"type": "string", "description": "Unit.", "enum": ["c", "f"]},
                "city": {"type": "string", "description": "City <name>."}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "calculator", "description": "Evaluates & rounds.", "parameters": {
                "type": "object", "properties": {"expression": {"type": "string", "description": "Expression."},
                "digits": {"type": "integer", "description": "Digits."}, "exact": {"type": "boolean", "description": ""},
                "terms": {"type": "array", "description": "Terms."}}, "required": ["expression"]}}}
        ]),
    ));
    // Qwen3's own template, as a Go template, on the same conversations.
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("qwen3-tokenizer/tokenizer_config.json")).unwrap()).unwrap();
    let qwen = ChatTemplate::new(tc["chat_template"].as_str().unwrap(), "", "<|im_end|>").unwrap();
    assert_eq!(Family::of(&qwen.source), Some(Family::QwenTools));
    // As a server gets them: ending before an answer (Qwen3 writes an empty
    // <think> block into a final assistant turn, which Ollama never renders);
    // without the synthetic conversation's enum, which Ollama cannot write
    // as Qwen's `tojson` does.
    let qwen_requests: Vec<(serde_json::Value, serde_json::Value)> = requests[..requests.len() - 1]
        .iter()
        .map(|(m, t)| {
            let mut m = m.as_array().unwrap().clone();
            if m.last().is_some_and(|x| x["role"] == "assistant") {
                m.pop();
            }
            (serde_json::Value::Array(m), t.clone())
        })
        .collect();
    let qwen_requests = &qwen_requests[..];
    let qwen_rendered = ollama_render(&go, &Family::QwenTools.go_template("<|im_end|>"), qwen_requests);
    for ((messages, tools), (prompt, tag, uses_tools)) in qwen_requests.iter().zip(&qwen_rendered) {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let tools = (!tools.is_null()).then_some(tools);
        assert_eq!(prompt, &qwen.render(&messages, tools, true).unwrap(), "Qwen3: Go and Jinja differ on {messages:?}");
        assert!(uses_tools);
        assert_eq!(tag, "<tool_call>");
    }
    // `chatml-tools` (for ChatML models without tools: SmolLM2) is Qwen's
    // tool block without reasoning blocks: the same Go template renders
    // whole conversations, final answers included.
    let chatml = ChatTemplate::new(builtin("chatml-tools"), "", "<|im_end|>").unwrap();
    assert_eq!(Family::of(&chatml.source), Some(Family::QwenTools));
    let whole = &requests[..requests.len() - 1];
    let chatml_rendered = ollama_render(&go, &Family::QwenTools.go_template("<|im_end|>"), whole);
    for ((messages, tools), (prompt, tag, uses_tools)) in whole.iter().zip(&chatml_rendered) {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let tools = (!tools.is_null()).then_some(tools);
        let want = chatml.render(&messages, tools, true).unwrap();
        assert_eq!(prompt, &want, "chatml-tools: Go and Jinja differ on {messages:?}");
        assert!(uses_tools);
        assert_eq!(tag, "<tool_call>");
    }
    let go_template = Family::GemmaTools.go_template("<eos>");
    let rendered = ollama_render(&go, &go_template, &requests);
    for ((messages, tools), (prompt, tag, uses_tools)) in requests.iter().zip(&rendered) {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let tools = (!tools.is_null()).then_some(tools);
        let want = jinja.render(&messages, tools, true).unwrap();
        assert_eq!(format!("<bos>{prompt}"), want, "Go and Jinja differ on {messages:?}");
        assert!(uses_tools, "Ollama would refuse `tools` for this template");
        assert_eq!(tag, "<tool_call>");
        // The calls training renders (and the model learns) open with that tag.
        for m in messages.iter().filter(|m| m.tool_calls.is_some()) {
            let turn = jinja.render(&[Message::new("user", "q"), m.clone()], None, false).unwrap();
            assert!(
                turn.contains(&format!(
                    "<start_of_turn>model\n{}",
                    if m.content.is_empty() { tag.clone() } else { format!("{}\n{tag}", m.content) }
                )),
                "{turn}"
            );
        }
    }
    assert!(
        with_calls >= 40 && with_results >= 40,
        "{with_calls} conversations with calls, {with_results} with results"
    );
    eprintln!(
        "Ollama's templates (Go text/template) = training's Jinja on {} conversations for gemma-tools, {} for \
         Qwen3 and {} for chatml-tools ({with_calls} with calls, {with_results} with tool results); tag {:?}",
        rendered.len(),
        qwen_rendered.len(),
        chatml_rendered.len(),
        rendered[0].1
    );
}

/// Llama 3.2's own template (from the provisioned Llama 3.2 tokenizer) as
/// Ollama's Go template renders the tool-use conversations as training
/// does, through the first user turn's tool list, calls, `ipython` results
/// and answers; Ollama accepts `tools` for it and reads a call at `{`. A
/// conversation with two calls in one turn is refused by the Jinja itself
/// ("This model only supports single tool-calls at once!"), as format-chat
/// drops it; the rest render byte for byte, the synthetic one's system
/// prompt, non-ASCII text and mixed arguments included.
#[test]
fn ollama_renders_llama3_tool_conversations_as_training_did() {
    let (Some(models), Some(go)) = (common::models_dir(), common::go()) else { return };
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join("llama3.2-tokenizer/tokenizer_config.json")).unwrap())
            .unwrap();
    let llama = ChatTemplate::new(tc["chat_template"].as_str().unwrap(), "<|begin_of_text|>", "<|eot_id|>").unwrap();
    assert_eq!(Family::of(&llama.source), Some(Family::Llama3Tools));
    let mut requests = common::native_tool_conversations(&models);
    requests.push((
        serde_json::json!([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "北京的天气？ Also is 3 > 2 & 1 < 2?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": {"digits": 2, "exact": true, "expression": "3 > 2 & 1 < 2", "terms": [1, "a"]}}}]},
            {"role": "tool", "content": "True"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "Thanks"}
        ]),
        serde_json::json!([
            {"type": "function", "function": {"name": "calculator", "description": "Evaluates & rounds.", "parameters": {
                "type": "object", "properties": {"digits": {"type": "integer", "description": "Digits."},
                "exact": {"type": "boolean", "description": ""}, "expression": {"type": "string", "description": "Expression."},
                "terms": {"type": "array", "description": "Terms."}}, "required": ["expression", "digits"]}}},
            {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {
                "type": "object", "properties": {}, "required": []}}}
        ]),
    ));
    let (mut rendered, mut refused) = (Vec::new(), 0);
    for (messages, tools) in &requests {
        let parsed: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
        let tools_opt = (!tools.is_null()).then_some(tools);
        match llama.render(&parsed, tools_opt, true) {
            Ok(want) => rendered.push(((messages.clone(), tools.clone()), want)),
            Err(e) => {
                assert!(e.to_string().contains("single tool-calls"), "{e}");
                refused += 1;
            }
        }
    }
    let go_requests: Vec<_> = rendered.iter().map(|(r, _)| r.clone()).collect();
    let got = ollama_render(&go, &Family::Llama3Tools.go_template("<|eot_id|>"), &go_requests);
    for (((messages, _), want), (prompt, tag, uses_tools)) in rendered.iter().zip(&got) {
        assert_eq!(&format!("<|begin_of_text|>{prompt}"), want, "Llama 3.2: Go and Jinja differ on {messages}");
        assert!(uses_tools, "Ollama would refuse `tools` for this template");
        assert_eq!(tag, "{");
    }
    assert!(rendered.len() >= 50, "{} conversations rendered, {refused} refused", rendered.len());
    eprintln!(
        "Ollama's template (Go text/template) = Llama 3.2's Jinja on {} tool-use conversations ({refused} with two \
         calls in a turn, refused by the Jinja); tag {:?}",
        rendered.len(),
        got[0].1
    );
}
