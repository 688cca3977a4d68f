from services.qa_generator.server import main

main()
