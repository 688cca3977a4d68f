from services.plot_llm.server import main

main()
