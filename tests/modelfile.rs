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
