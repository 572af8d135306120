"""How agent-guard's Claude token estimate compares with a Claude tokenizer, by kind of text.

Claude's current tokenizer is not public. The one Anthropic did publish (Claude 1/2,
``tokenizer.json`` in the ``anthropic`` Python SDK before 0.39) is the measure here:

    pip download anthropic==0.38.0 --no-deps -d /tmp/a && cd /tmp/a && \\
        unzip -o anthropic-0.38.0-*.whl anthropic/tokenizer.json
    python scripts/claude_token_factor.py /tmp/a/anthropic/tokenizer.json

For each text: its o200k_base count, the Claude tokenizer's, their ratio, and agent-guard's
estimate (``TokenCounter().count_text(text, "claude-...")``) over the Claude count (must be
>= 1). Needs the ``tokenizers`` package (a dependency of ``transformers``, ``litellm``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_guard.tokens import TokenCounter  # noqa: E402

LANGS = {
    "german": "Die Kommission hat die Quartalszahlen geprüft und beschlossen, dass das Budget "
              "für die nächste Version innerhalb der im Frühjahr festgelegten Grenzen bleiben "
              "soll. Die Mitarbeiter wurden gebeten, ihre Reisekosten bis Ende des Monats "
              "einzureichen.",
    "french": "Le comité a examiné les chiffres du trimestre et a convenu que le budget de la "
              "prochaine version devait rester dans les limites fixées au printemps. Les "
              "employés doivent soumettre leurs frais de déplacement avant la fin du mois.",
    "spanish": "El comité revisó las cifras trimestrales y acordó que el presupuesto de la "
               "próxima versión debe mantenerse dentro de los límites fijados en primavera. "
               "Los empleados deben presentar sus gastos de viaje antes de fin de mes.",
    "russian": "Комиссия рассмотрела квартальные показатели и решила, что бюджет следующего "
               "выпуска должен оставаться в пределах, установленных весной. Сотрудников "
               "попросили представить дорожные расходы до конца месяца.",
    "chinese": "委员会审查了季度数据并同意下一版本的预算应保持在春季设定的限额之内。"
               "员工被要求在月底前提交差旅费用。",
    "japanese": "委員会は四半期の数字を検討し、次のリリースの予算は春に設定された上限内に"
                "収めるべきだと合意した。従業員は月末までに出張費を提出するよう求められた。",
    "korean": "위원회는 분기별 수치를 검토하고 다음 릴리스의 예산이 봄에 정한 한도 내에서 "
              "유지되어야 한다는 데 동의했다. 직원들은 월말까지 출장비를 제출하라는 요청을 "
              "받았다.",
    "arabic": "راجعت اللجنة الأرقام الفصلية واتفقت على أن تبقى ميزانية الإصدار القادم ضمن "
              "الحدود المحددة في الربيع. طُلب من الموظفين تقديم نفقات السفر قبل نهاية الشهر.",
    "hindi": "समिति ने तिमाही के आंकड़ों की समीक्षा की और सहमति व्यक्त की कि अगले संस्करण का "
             "बजट वसंत में निर्धारित सीमाओं के भीतर रहना चाहिए। कर्मचारियों से महीने के अंत "
             "तक अपने यात्रा खर्च जमा करने को कहा गया।",
}


def samples() -> dict[str, str]:
    prices = json.loads((ROOT / "agent_guard/pricing/data/model_prices.json").read_text())
    schema = {"name": "search_orders", "description": "Search the customer's orders by date.",
              "input_schema": {"type": "object", "properties": {
                  "customer_id": {"type": "string"},
                  "status": {"type": "string", "enum": ["open", "shipped", "cancelled"]}},
                  "required": ["customer_id"]}}
    out = {
        "prose (README)": (ROOT / "README.md").read_text()[:20_000],
        "prose (docs)": (ROOT / "docs" / "money-truth.md").read_text()[:20_000],
        "python": (ROOT / "agent_guard" / "guard.py").read_text()[:20_000],
        "json (prices)": json.dumps(prices["models"]["claude-sonnet-4-5"], indent=2) * 10,
        "json (tool schema)": json.dumps(schema) * 20,
    }
    out.update({name: text * 20 for name, text in LANGS.items()})
    return out


def main() -> None:
    from tokenizers import Tokenizer

    claude = Tokenizer.from_file(sys.argv[1])
    counter = TokenCounter()
    print(f"{'text':20} {'o200k':>6} {'claude':>6} {'ratio':>6} {'estimate':>8} "
          f"{'est/claude':>10}")
    for name, text in samples().items():
        o200k = counter.count_text(text, "gpt-4o")
        real = len(claude.encode(text).ids)
        est = counter.count_text(text, "claude-sonnet-4-5")
        print(f"{name:20} {o200k:6d} {real:6d} {real / o200k:6.2f} {est:8d} "
              f"{est / real:10.2f}")


if __name__ == "__main__":
    main()
