//! The loss curve as an SVG: training loss per step (faint) with its
//! exponential moving average, and validation loss where it was measured.

use std::path::Path;

use crate::error::{Error, Result};
use plotters::prelude::*;

use super::checkpoint::LogRow;

/// Draws `log` (and the validation loss before training, at step 0).
pub fn loss_curve(path: &Path, title: &str, log: &[LogRow], initial_eval: Option<f64>) -> Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    let max_step = log.last().map_or(1, |r| r.step).max(1) as f64;
    let losses = log
        .iter()
        .map(|r| r.loss)
        .chain(log.iter().filter_map(|r| r.eval_loss))
        .chain(initial_eval)
        .filter(|l| l.is_finite());
    let (lo, hi) = losses.fold((f64::MAX, f64::MIN), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..max_step, (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss")
        .draw()
        .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    let faint = BLUE.mix(0.25);
    chart
        .draw_series(LineSeries::new(log.iter().map(|r| (r.step as f64, r.loss)), faint))
        .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?
        .label("train (per step)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], faint));
    // Exponential moving average, as TensorBoard's smoothing (weight 0.9).
    let mut ema = None;
    let smoothed: Vec<(f64, f64)> = log
        .iter()
        .map(|r| {
            let v = ema.map_or(r.loss, |e: f64| 0.9 * e + 0.1 * r.loss);
            ema = Some(v);
            (r.step as f64, v)
        })
        .collect();
    chart
        .draw_series(LineSeries::new(smoothed, BLUE.stroke_width(2)))
        .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?
        .label("train (smoothed)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    let eval: Vec<(f64, f64)> = initial_eval
        .map(|l| (0.0, l))
        .into_iter()
        .chain(log.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))))
        .collect();
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        chart
            .draw_series(eval.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    root.present().map_err(|e| Error::Plot { file: path.to_path_buf(), message: e.to_string() })?;
    Ok(())
}

/// The loss log as `loss.csv` (one row per optimizer step).
pub fn loss_csv(log: &[LogRow]) -> String {
    let mut csv = String::from("step,epoch,loss,lr,grad_norm,supervised_tokens,eval_loss\n");
    for r in log {
        let eval = r.eval_loss.map(|l| format!("{l:.6}")).unwrap_or_default();
        csv += &format!("{},{},{:.6},{:.6e},{:.6},{},{eval}\n", r.step, r.epoch, r.loss, r.lr, r.grad_norm, r.tokens);
    }
    csv
}

/// Reads `loss.csv` back (as [`loss_csv`] writes it); lines that do not
/// parse are skipped.
pub fn read_loss_csv(text: &str) -> Vec<LogRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            if f.len() < 7 {
                return None;
            }
            Some(LogRow {
                step: f[0].parse().ok()?,
                epoch: f[1].parse().ok()?,
                loss: f[2].parse().ok()?,
                lr: f[3].parse().ok()?,
                grad_norm: f[4].parse().ok()?,
                tokens: f[5].parse().ok()?,
                eval_loss: f[6].trim().parse().ok(),
                time: None,
            })
        })
        .collect()
}

/// Several runs' loss curves on one chart (a sweep's variants): each run's
/// smoothed training loss as a line, its validation loss as dots joined by a
/// thinner line of the same colour, one legend entry per run.
pub fn loss_curves(path: &Path, title: &str, runs: &[(String, Vec<LogRow>)]) -> Result<()> {
    let plot_err = |e: &dyn std::fmt::Display| Error::Plot { file: path.to_path_buf(), message: e.to_string() };
    let runs: Vec<&(String, Vec<LogRow>)> = runs.iter().filter(|(_, log)| !log.is_empty()).collect();
    if runs.is_empty() {
        return Ok(());
    }
    let smooth = |log: &[LogRow]| -> Vec<(f64, f64)> {
        let mut ema: Option<f64> = None;
        log.iter()
            .map(|r| {
                let v = ema.map_or(r.loss, |e| 0.9 * e + 0.1 * r.loss);
                ema = Some(v);
                (r.step as f64, v)
            })
            .collect()
    };
    let max_step = runs.iter().flat_map(|(_, l)| l.last()).map(|r| r.step).max().unwrap_or(1).max(1) as f64;
    let values: Vec<f64> = runs
        .iter()
        .flat_map(|(_, l)| smooth(l).into_iter().map(|p| p.1).chain(l.iter().filter_map(|r| r.eval_loss)))
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &l| (lo.min(l), hi.max(l)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..max_step, (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| plot_err(&e))?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss (train smoothed; dots: validation)")
        .draw()
        .map_err(|e| plot_err(&e))?;
    for (i, (label, log)) in runs.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(smooth(log), colour.stroke_width(2)))
            .map_err(|e| plot_err(&e))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
        let eval: Vec<(f64, f64)> = log.iter().filter_map(|r| r.eval_loss.map(|l| (r.step as f64, l))).collect();
        chart.draw_series(LineSeries::new(eval.iter().copied(), colour.mix(0.5))).map_err(|e| plot_err(&e))?;
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(|e| plot_err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_err(&e))?;
    root.present().map_err(|e| plot_err(&e))?;
    Ok(())
}
